"""What the command line and the HTTP layer call: the query service (charge first, then
read), the steward's and oversight's operations, request/response schemas, start-up.
"""
