"""``edgecomp tune``: edgecomp's own kernels searched with MetaSchedule, measured on a device.

- :mod:`.run` - a tuning run: tasks, defaults, budget, search, progress, the final table;
- :mod:`.search` - each task's design space (its edgecomp rule), mutators, the cost model;
- :mod:`.measure` - the devices, the warm build pool, the runner with its memo;
- :mod:`.workdir` - the resumable work dir and the databases ``compile`` applies.
"""

from edgecomp.tuning.measure import Devices
from edgecomp.tuning.run import TuneResult, format_table, tune, tune_kernels
from edgecomp.tuning.search import kernel_tasks
from edgecomp.tuning.workdir import WorkDir, open_database, tuning_database

__all__ = [
    "Devices",
    "TuneResult",
    "WorkDir",
    "format_table",
    "kernel_tasks",
    "open_database",
    "tune",
    "tune_kernels",
    "tuning_database",
]
