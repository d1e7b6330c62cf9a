"""End-to-end fault-injection and interoperability tests: the installed ``hermes-py serve``
against real peers (DCMTK, Orthanc, scripted pynetdicom destinations)."""
