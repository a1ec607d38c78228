"""Fault tolerance: what keeps a run on hundreds of accelerators going, and shows where time went.

  storage     run and checkpoint folders checked for writes and free space before training
  health      at start: every rank answers; each mesh group's bandwidth against its peers
  watchdog    a step that hangs dumps every rank's stacks and flight record, then exits for a restart
  stragglers  per-rank device probe and data wait each log window; the slow rank and host named
  goodput     wall time accounted into steps, data waits, saves, start-up, lost work and recovery
  elastic     what a restart at another world size changed, and a clear stop when it cannot
  guard       the calls the training loop makes into all of the above
  audit       what a run's kept steps trained, from its sample ledger and goodput records
  jobs        launches with timestamped output lines, process trees, worker pids (for the drills)
  inject      faults installed inside a worker: a small disk at the file-writing seam, a NaN step
  chaos       the chaos suite: a table of faults injected into real jobs (``sora-dist fault-drill``)
"""
