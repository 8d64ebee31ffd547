"""Where events enter and are decided.

polling.py        the three ways to find changes (last-updated, history, date-window), with the
                  cursor/sweep plan of cursor.py (pure)
subscriptions.py  what FHIR Subscription notifications (parsed by notifications.py, pure) set off:
                  a resync, a read, a deletion; the watchdog that keeps Subscriptions alive
crm.py            CRM events from the inbox, planned with the mappings
planner.py        examine (checks.py, pure) → decide (decide.py, pure) → commit, for every way in
replay.py         a window of a source (or a file) planned again; dry runs
"""
