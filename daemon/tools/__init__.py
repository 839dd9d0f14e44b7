"""Tools around the daemon, not the daemon: ``demo``, ``bench``, ``xenstored`` and the
helpers that run the daemon against the simulated host.

Only the CLI reaches in here, lazily, when a tool sub-command is asked for; the
daemon's own process modules never import a tool or the simulator
(``tests/test_layout.py``).
"""
