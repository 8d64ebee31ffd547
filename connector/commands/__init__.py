"""What each CLI command does, apart from parsing arguments (connector.cli) and printing (connector.report).

files.py    validate, render (and reading Bundle / NDJSON files)
run.py      run (once, for ever, dry run), replay, subscribe: through a Runtime
ledger.py   status, resolve, optout, db upgrade: the ledger alone
scaffold.py init
"""
