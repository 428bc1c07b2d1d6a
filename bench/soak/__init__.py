"""`make soak`: minutes of uploads under faults, then proof that nothing was lost (docs/soak.md).

Run it as ``python -m soak`` from bench/ (the Makefile does). The parts:

- `soak.run`: the run itself (the stream of uploads, the faults at their times, the drain, the
  checks on the log) and its command line;
- `soak.corpus`: the seeded uploads, with awkward names and known bytes, clean or infected;
- `soak.schedule`: the faults and when each happens;
- `soak.daemons`: the `watcher run` processes under test and their merged log;
- `soak.verify`: where every upload ended, against where it must be;
- `soak.report`: the table, from the figures measured (plain data).
- `soak.webhooks`: the app's webhook receiver in the loop (taken down twice), and which
  uploads' verdicts never reached it.
"""

import benchlib  # noqa: F401 (first: puts tests/ on sys.path, for the harness)
