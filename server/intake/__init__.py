"""A steward's data intake: importing a source into a dataset folder with a draft
declaration, checking a folder against its declaration, and preparing a version for
queries when it is registered.
"""
