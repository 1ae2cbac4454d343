"""The drop folder (``STATE_DIR/spool``): how prompt files reach the daemon.

Writers create a file in ``tmp/`` and rename it into ``incoming/`` (``incoming/force/``
to skip the duplicate check). ``watcher`` turns inotify events into hints for the loop;
``intake`` scans, reads and moves files on the loop thread (``accepted/`` once the batch
is recorded, ``rejected/`` with a ``.reason`` file); ``settle`` decides when a file is
complete; ``layout`` names the directories; ``commands`` carries ``submit.py`` commands.
"""
