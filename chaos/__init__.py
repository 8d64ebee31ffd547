"""Chaos run: many appointments, random Paubox faults, daemons killed with SIGKILL; then count per key.

Starts the FHIR test server (N generated Patients and N booked Appointments a few days ahead), the Paubox
sandbox with random faults (`connector sandbox --chaos`), and R `connector run` daemons on one ledger. While
the emails go out it kills a random daemon with SIGKILL K times and restarts it. When every expected
notification is final in the ledger (sent, failed, in_doubt, skipped, cancelled), or the timeout passes, it
lets webhooks settle, stops the daemons with SIGTERM and compares what the sandbox accepted, per key, with
the ledger. Exit 0 only when no email was accepted twice and none is silently missing.

Run it as `./scripts/chaos --help` (or `python -m chaos`). Everything runs on 127.0.0.1; every process it
starts is stopped on any exit (also Ctrl-C and SIGTERM); its files stay in the temp folder it prints.

    options   the command line and its help
    world     the generated data, the daemons' config, reads of the ledger
    verdict   what the sandbox accepted against the ledger, per appointment (pure), and the table
    run       the processes, the kills, and `main`
"""
