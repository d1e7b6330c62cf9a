"""What the tests and the benchmark are built from. No pytest in here: ``bench/`` imports it.

- ``peers``: the real DICOM peers (ScriptedSCP, DCMTK storescp/dcmsend/storescu/
  echoscu, Orthanc, ``Modality``) and the waiting helpers (``wait_for``, ``wait_port``,
  ``free_port``).
- ``dicomgen``: DICOM test instances (small, CT-like, compressed, private, corpora).
- ``config``: rules.toml as data (``Config``, ``Dest``, ``rule``), written as an editor
  saves it.
- ``spool``: ``put`` one instance (a .dcm and its sidecar) in a spool folder with the
  package's verbs and sidecar builders; readers of folders, sidecars and state files.
- ``serve``: ``Hermes``, the installed ``hermes-py serve`` as its own process group,
  seen as an operator sees it; process helpers (``alive``, ``group_members``).
- ``cli``: the installed ``hermes-py`` as a subprocess (``run``, ``one_error_line``).
- ``fs``: a real small filesystem (tmpfs) for ENOSPC.

The pytest side (turning ``ToolMissing`` into a skip, or a failure in CI; the
fixtures) is tests/conftest.py.
"""
