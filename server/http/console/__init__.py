"""The web console: server-rendered pages for oversight, stewards, analysts and feed consumers.

A browser signs in once with an API key and gets a server-side session (:mod:`.sessions`);
every page then calls the same route handlers and services the ``/v1`` API calls, under the
same Casbin checks, ledger and audit log (:mod:`.deps`). Templates and static assets (the
vendored Chart.js) ship inside this package, so the console works on an air-gapped network.
"""
