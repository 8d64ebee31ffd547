"""Clients of the servers the connector reads: FHIR (fhir_poll.py, with SMART auth in smart.py and the
limits of every request in bounded.py) and the HubSpot CRM API (hubspot.py); cache.py keeps what a poll saw
for the dispatcher. What the answers mean is decided in connector.intake."""
