"""Workload replay: the Torpor trace, a load generator against OpenWhisk actions, reports.

``loadgen.trace`` draws arrival schedules from the trace, ``loadgen.replay`` issues them
(``torpor loadgen``), ``loadgen.stats`` holds the latency statistics and ``loadgen.report``
the plots (``torpor report``). The names below are the in-process API used by ``torpor up``.
"""
from loadgen.replay import FunctionLoad, openwhisk_invoker, replay
from loadgen.report import write_report
from loadgen.trace import default_trace_path, load_trace, schedule

__all__ = ["FunctionLoad", "default_trace_path", "load_trace", "openwhisk_invoker", "replay", "schedule",
           "write_report"]
