"""What can be asked and how it is answered.

Typed, JSON-serialisable query specs, their validation against the data owner's
dataset metadata, and the planner/engine that compiles a spec into a private
computation over the data. Depends on :mod:`privacy` only.
"""
