"""`memserve loadgen`: a load generator for stateful sessions (what ghz and Triton's
perf_analyzer do, with sessions that live on the server).

Modules, in the order a run uses them:

| module | what |
| --- | --- |
| `cli.py` | the command line: options and their checks |
| `settings.py` | `Settings`: everything a run works from |
| `workloads.py` | `step` and `chat` over gRPC: sessions, one request, call counts |
| `schedule.py` | closed and open loop over any `Target`; the measuring window |
| `recording.py` | what a level measured: HdrHistogram latencies, counts by status code |
| `server_metrics.py` | the server's /metrics, before and after a window |
| `progress.py` | the live progress line on stderr |
| `report.py` | the table, JSON, CSV and the plot |
| `run.py` | one run: connect, check, every level, the outputs, Ctrl-C |

Only `cli.py` is imported by `memserve --help`; the rest load when a run starts.
"""

from clients.loadgen.cli import add_loadgen_parser

__all__ = ["add_loadgen_parser"]
