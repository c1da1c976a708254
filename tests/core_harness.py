"""The job lifecycle in-process, with a real store and an executor that only records what it is given:
for the orderings real brokers hit only under load, made to happen on purpose."""
from __future__ import annotations

from pathlib import Path

from park_broker.core.events import EventHub
from park_broker.core.lifecycle import Lifecycle
from park_broker.core.store import Store
from park_broker.execution.base import Task
from park_broker.packages.store import PackageStore
from park_broker.site import SiteInfo


class RecordingExecutor:
    def __init__(self) -> None:
        self.tasks: list[Task] = []

    async def start(self, on_started, on_finished) -> None:  # type: ignore[no-untyped-def]
        pass

    def submit(self, task: Task) -> None:
        self.tasks.append(task)

    def cancel(self, job_id: str) -> None:
        pass

    def capacity(self) -> int | None:
        return None

    async def close(self) -> None:
        pass


def in_process_core(directory: Path) -> tuple[Lifecycle, RecordingExecutor, Store]:
    """A lifecycle for site `sns` over the store in `directory` (call inside a running event loop);
    a second call on the same directory is the broker restarted."""
    hub = EventHub()
    store = Store(directory / "park.db", on_commit=hub.publish)
    store.open()
    executor = RecordingExecutor()
    core = Lifecycle(SiteInfo("sns", directory / "files"), store, executor, hub,  # type: ignore[arg-type]
                     PackageStore(directory / "packages"))
    return core, executor, store
