"""``make bench``: hermes_py measured against DCMTK and Orthanc on the same machine.

Absolute rates drift on a shared machine; ratios taken in one run do not, so every
figure is reported next to the native DCMTK-to-DCMTK rate (``direct``) and next to
what a user would otherwise run (Orthanc with the canonical Lua autorouting).

Modules: ``corpus`` (generated instances, never committed), ``procs`` (the processes
the benchmark starts and always stops, RSS sampling), ``scenarios`` (what is timed
and how), ``report`` (table, targets, JSON), ``profiling`` (py-spy summaries),
``run`` (the command line behind ``make bench``).
"""
