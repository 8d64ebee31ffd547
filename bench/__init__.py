"""The connector benchmark (`./bench/run`, or `python -m bench`): what it measures is in bench/README.md.

__main__  the command line and the run of the parts
parts     the measurements: start-up, end to end, growth, memory, latency
endtoend  `connector run --once` processes measured from their start (and the start-up rows)
naive     the baseline: a script that sends one message at a time
subscribed  latency with a rest-hook Subscription
rig       the processes it starts (through `connector.testing`) and one measured pipeline run
table     the printed table and the facts about the machine
servers   the FHIR test server and the Paubox sandbox, each in a process of its own
sekmet    end to end against sekmet-fhir, a real FHIR server from PyPI (sekmet_server.py serves it)
workers   what runs in the measured connector processes
"""
