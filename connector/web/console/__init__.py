"""The operator console in the browser: pages (connector.web.console.pages), sign-in and sessions (.auth),
what each page shows (.facts), charts (.chart), Jinja2 templates (templates/, package data).

Served by `connector run` under `console.path` when `console:` is configured, and alone by
`connector console serve` against the same ledger.
"""
