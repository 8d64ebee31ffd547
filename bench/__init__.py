"""The connector benchmark (`./bench/run`, or `python -m bench`): what it measures is in bench/README.md.

__main__  the command line and the run of the parts
parts     the measurements: throughput, ledger on/off, memory, latency
rig       the processes it starts (through `connector.testing`) and one measured pipeline run
table     the printed table and the facts about the machine
servers   the FHIR test server and the Paubox sandbox, each in a process of its own
workers   what runs in the measured connector processes
"""
