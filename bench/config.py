"""How big each scenario is: the full run's defaults and the quick run's.

The full run is sized for about twelve minutes on a 2-core machine: runs long
enough (most near a second or more) and rounds enough (median of 5) that a
scheduler hiccup does not decide a ratio. ``--quick`` runs every scenario
small, in well under two minutes. Counts are per
scenario; see each scenario module for what they mean.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Tuple

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Config:
    # 1. per-call latency: calls per system in all, split over interleaved rounds
    latency_calls: int = 200_000
    latency_rounds: int = 5
    latency_warmup: int = 2_000
    latency_record: int = 100
    # 2. end-to-end throughput: records per run = min(max records, max bytes / size), split over clients
    throughput_sizes: Tuple[int, ...] = (16, 100, KIB, 4 * KIB, 64 * KIB)
    throughput_clients: Tuple[int, ...] = (1, 8)
    throughput_max_records: int = 1_000_000
    throughput_max_bytes: int = 256 * MIB
    throughput_rounds: int = 5
    # 3. stalled disk: a FIFO nobody reads for stall_s, then read at drain_rate bytes/s
    stall_s: float = 2.0
    stall_duration_s: float = 4.0
    stall_period_ms: float = 1.0
    stall_drain_rate: int = 64 * KIB
    stall_pipe_size: int = 4 * KIB  # the FIFO's buffer (F_SETPIPE_SZ; Linux default 64 KiB)
    stall_record: int = 100
    # 4, 6, 7: the ring server's --max-ring-memory leaves room for a ring of this size for every client
    ring_memory_per_client: int = 4 * MIB
    # 4. many clients: total records per run, spread over the clients; clients are threads in <= N processes
    clients_counts: Tuple[int, ...] = (1, 16, 64, 256, 1024)
    clients_records: int = 512_000
    clients_processes: int = 4
    clients_rounds: int = 3
    clients_record: int = 100
    # 5. server restart and stall: a record every restart_period_us (busy-paced); restart_lead_s in, the server
    # is SIGKILLed and a new one started restart_gap_s later, or SIGSTOPped for restart_stop_s; writing goes on
    # restart_tail_s after that; close() is the barrier, bounded by restart_close_timeout_ms
    restart_period_us: float = 50.0
    restart_lead_s: float = 1.0
    restart_gap_s: float = 0.5
    restart_stop_s: float = 5.0
    restart_tail_s: float = 3.0
    restart_close_timeout_ms: int = 20_000
    restart_record: int = 100
    # 6. paced clients: each client writes paced_rate records/s for paced_seconds; clients are threads in
    # <= paced_processes processes; the table shows the median (by server CPU) of paced_rounds runs
    paced_counts: Tuple[int, ...] = (256, 1024)
    paced_rate: int = 100
    paced_seconds: float = 5.0
    paced_processes: int = 4
    paced_rounds: int = 3
    paced_record: int = 100
    # 7. idle clients: idle_clients connect, write one record, settle idle_settle_s, stay idle idle_seconds,
    # then all close at once
    idle_clients: int = 2000
    idle_processes: int = 4
    idle_seconds: float = 10.0
    idle_settle_s: float = 1.0
    idle_close_timeout_ms: int = 5000
    idle_record: int = 100


FULL = Config()
QUICK = replace(
    FULL,
    latency_calls=20_000,
    latency_rounds=2,
    latency_warmup=500,
    throughput_max_records=40_000,
    throughput_max_bytes=32 * MIB,
    throughput_rounds=1,
    stall_s=0.6,
    stall_duration_s=1.2,
    clients_records=32_000,
    clients_rounds=1,
    restart_lead_s=0.3,
    restart_stop_s=1.0,
    restart_tail_s=1.2,
    paced_counts=(64, 256),
    paced_seconds=2.0,
    paced_rounds=1,
    idle_clients=200,
    idle_seconds=2.0,
    idle_settle_s=0.5,
)
