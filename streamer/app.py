"""The composition root: build every component, run the intake loop, drain, stop.

Start order (stop runs it backwards): shared-memory slots -> decode and inference
workers -> batcher -> producer -> consumer -> metrics server. The service is
ready once the consumer has joined and the model is warm.

Shutdown has three phases: stop taking work (pause the consumer), let in-flight
records finish within ``drain_timeout_s``, then cancel what is left (it stays
uncommitted and is processed again after a restart). Offsets done so far are
committed before the consumer leaves the group.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Awaitable
from typing import Any

from streamer.config import Settings
from streamer.errors import DeliveryAbandoned, StreamerError
from streamer.http import MetricsServer
from streamer.kafka.delivery import AtLeastOnce, Delivery
from streamer.kafka.intake import Intake
from streamer.kafka.partitions import Partitions, RebalanceListener, Ticket
from streamer.kafka.records import Record
from streamer.kafka.transactions import ExactlyOnce
from streamer.loopmon import LoopLagMonitor
from streamer.metrics import Metrics
from streamer.pipeline.engine import Engine
from streamer.pipeline.processor import ProcessorConfig, RecordProcessor
from streamer.vision.models import imagenet_labels

log = logging.getLogger(__name__)


class State(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Service:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.state = State.CREATED
        self.loop_lag = LoopLagMonitor(observe=self.metrics.loop_lag.observe)
        self.metrics.declare_topics(settings.input_topic, settings.output_topic, settings.dlq_topic)
        self.engine = Engine(settings, self.metrics)
        self._permits = asyncio.Semaphore(settings.max_in_flight)
        # Each holds a permit; keyed by a sequence number that its own task removes
        # (looking the task up with asyncio.current_task() cost more per record).
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._sequence = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_requested = asyncio.Event()
        self._fatal: BaseException | None = None
        self._ready = False
        self._processor: RecordProcessor | None = None
        self._delivery: Delivery | None = None
        self._intake: Intake | None = None
        self._partitions: Partitions | None = None
        self._metrics_server: MetricsServer | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """Why ``/readyz`` answers 503, or None when the service is ready: it is running,
        is a member of its group with a reachable coordinator, and no partition is stalled
        (records pending or lag, and no commit for ``stall_timeout_s``)."""
        if not self._ready:
            return self.state.value
        if self._intake is not None and (problem := self._intake.group_problem()):
            return problem
        if self._partitions is not None and (stalled := self._partitions.stalled()):
            names = ", ".join(f"{lease.tp.topic}-{lease.tp.partition}" for lease in stalled)
            return (
                f"partitions {names} made no progress for {self.settings.stall_timeout_s:g} s "
                "with records to process"
            )
        return None

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server else None

    async def start(self) -> None:
        s = self.settings
        self.state = State.STARTING
        try:
            await self._start_components(s)
        except BaseException:
            await self.stop()
            raise
        self.state = State.RUNNING
        self._ready = True
        self.metrics.ready.set(1)
        log.info(
            "service running input=%s output=%s dlq=%s group=%s delivery=%s devices=%s",
            s.input_topic,
            s.output_topic,
            s.dlq_topic,
            s.group_id,
            s.delivery,
            self.engine.devices,
        )

    async def _start_components(self, s: Settings) -> None:
        # First, so /healthz answers (and /readyz says 503) while the model loads.
        self._metrics_server = MetricsServer(
            s.metrics_host, s.metrics_port, self.metrics.registry, self.not_ready_reason
        )
        await self._metrics_server.start()
        await self.engine.start()
        self._processor = RecordProcessor(
            ProcessorConfig.from_settings(s),
            self.engine,
            self.metrics,
            imagenet_labels(),
        )
        self._intake = Intake(s, self.metrics)
        delivery_mode = ExactlyOnce if s.delivery == "exactly-once" else AtLeastOnce
        self._delivery = delivery_mode(s, self.metrics, self._intake)
        self._partitions = Partitions(s, self.metrics, self._intake, self._delivery)
        await self._delivery.start()
        await self._intake.start(RebalanceListener(self._partitions))
        await self.loop_lag.start()
        # Read when scraped: counting per record cost the event loop four gauge updates.
        self.metrics.in_flight.set_function(lambda: len(self._in_flight))
        self.metrics.free_permits.set_function(lambda: s.max_in_flight - len(self._in_flight))
        self._tasks = [
            asyncio.create_task(self._intake_loop(), name="intake"),
            asyncio.create_task(self._commit_loop(), name="commit"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._on_background_done)

    async def run(self) -> None:
        """Start, serve until ``request_stop`` or a fatal error, then drain and stop."""
        await self.start()
        failures = [p.failed for p in self.engine.pools if p.failed]
        waiters: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(self._stop_requested.wait()),
            *failures,
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                if w.done() and not w.cancelled() and w.exception() is not None:
                    self._fatal = self._fatal or w.exception()
            waiters[0].cancel()
            await self.stop()
        if self._fatal is not None:
            raise self._fatal

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def stop(self) -> None:
        """Drain and tear down in reverse start order; safe to call twice."""
        if self.state in (State.STOPPED, State.DRAINING):
            return
        self.state = State.DRAINING
        self._ready = False
        self.metrics.ready.set(0)
        s = self.settings
        if self._intake is not None and self._intake.started:
            self._intake.stop_fetching()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._in_flight:
            log.info(
                "draining in_flight=%d timeout_s=%.1f", len(self._in_flight), s.drain_timeout_s
            )
            # 0 means no wait at all: cancel at once (None would wait forever).
            _, pending = await asyncio.wait(
                list(self._in_flight.values()), timeout=s.drain_timeout_s
            )
            if pending:
                log.warning(
                    "drain deadline passed; abandoning %d records (left uncommitted)", len(pending)
                )
                if self._delivery is not None:
                    self._delivery.abandon()
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        if self._partitions is not None:
            # Last commits and transactions, writers closed: before leaving the group,
            # so the next owner's fence never races them.
            await _teardown("partitions", self._partitions.close(drain_timeout_s=0.0))
        if self._intake is not None:
            await _teardown("consumer", self._intake.stop())
        if self._delivery is not None:
            await _teardown("producers", self._delivery.stop())
        await _teardown("engine", self.engine.stop())
        if self._metrics_server is not None:
            await _teardown("metrics server", self._metrics_server.stop())
        await self.loop_lag.stop()
        self.state = State.STOPPED
        log.info("service stopped")

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------ loops

    async def _intake_loop(self) -> None:
        """Take a permit per record (pausing the consumer when none is left), then process it."""
        assert self._intake is not None and self._partitions is not None
        intake = self._intake
        async for record, lease in intake.records(self._partitions):
            fetched_at = time.perf_counter()
            if self._permits.locked():
                intake.pause()
                await self._permits.acquire()
                intake.resume()
            else:
                await self._permits.acquire()
            ticket = lease.start(record.offset) if lease is not None else None
            if ticket is None:
                # Fetched while no lease was active, or its lease ended while we waited:
                # whoever owns the partition now fetches it again from the committed offset.
                self._permits.release()
                continue
            number = next(self._sequence)
            # The task cannot run before this loop awaits again: it is in the dict first.
            self._in_flight[number] = asyncio.create_task(
                self._handle(number, record, ticket, fetched_at, time.perf_counter() - fetched_at),
                name=f"record-{record.topic}-{record.partition}-{record.offset}",
            )

    async def _handle(
        self, number: int, record: Record, ticket: Ticket, fetched_at: float, permit_wait_s: float
    ) -> None:
        """One record from fetch to a durable outcome; holds its permit until done.

        The record's boundary: ``process`` turns whatever the record makes fail into its
        dead letter, and an outcome the delivery fails to send for a reason other than
        Kafka's becomes the record's ``internal-error`` dead letter here. What still
        escapes is not about this record (``OutputRejected``: the dead-letter topic
        refuses a dead letter of a few hundred bytes) and stops the service.
        """
        assert self._processor is not None and self._delivery is not None
        try:
            outcome = await self._processor.process(record, fetched_at, permit_wait_s)
            sent = time.perf_counter()
            try:
                written = await self._delivery.deliver(ticket, outcome)
            except (StreamerError, asyncio.CancelledError):
                raise
            except Exception as exc:
                if outcome.dead_letter_reason == "internal-error":
                    raise
                outcome = self._processor.internal_error(record, exc, "publish")
                written = await self._delivery.deliver(ticket, outcome)
            self._processor.delivered(record, written, time.perf_counter() - sent, fetched_at)
        except (DeliveryAbandoned, asyncio.CancelledError):
            pass  # stopping, or the partition moved: uncommitted, so processed again
        except Exception as exc:
            log.exception(
                "record failed unexpectedly topic=%s partition=%d offset=%d",
                record.topic,
                record.partition,
                record.offset,
            )
            self._fail(exc)
        finally:
            self._in_flight.pop(number, None)
            self._permits.release()

    async def _commit_loop(self) -> None:
        assert self._partitions is not None and self._delivery is not None
        interval = self.settings.commit_interval_ms / 1000.0
        while True:
            await asyncio.sleep(interval)
            await self._delivery.commit(self._partitions.active())
            self._partitions.update_lag()  # also when nothing moved: a stall must show as lag
            self.metrics.ready.set(int(self.ready))

    def _on_background_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed task=%s error=%r", task.get_name(), task.exception())
            self._fail(task.exception())  # type: ignore[arg-type]

    def _fail(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
        self._stop_requested.set()


async def _teardown(what: str, step: Awaitable[None]) -> None:
    """Run one shutdown step; a failing step is logged and the next ones still run."""
    try:
        await step
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we are being cancelled ourselves: do not swallow it
        log.warning("shutdown step was cancelled step=%s", what)
    except Exception:
        log.exception("shutdown step failed step=%s", what)
