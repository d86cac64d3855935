"""``tomqueue`` command line: migrate · worker · deferred · republish · status."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from tomqueue.config import Config
from tomqueue.errors import TomQueueError
from tomqueue.logconfig import add_options as add_log_options
from tomqueue.logconfig import setup as setup_logging
from tomqueue.runtime import settle_gc

log = logging.getLogger("tomqueue.cli")


def _config() -> Config:
    return Config.from_env()


def _say(line: str) -> None:
    """Progress of long CLI work: shown at once, even through a pipe or a log file."""
    print(line, flush=True)


def cmd_migrate(args: argparse.Namespace) -> int:
    from tomqueue.db import migrate

    migrate(_config(), echo=_say)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    if args.processes > 1:
        return _supervise(args)
    if args.metrics_port:
        from tomqueue.metrics import serve

        serve(args.metrics_port)
    from tomqueue.worker.process import Worker

    worker = Worker(
        _config(),
        imports=args.imports,
        queues=args.queues,
        threads=args.threads,
        min_priority=args.min_priority,
        max_priority=args.max_priority,
        exit_on_complete=args.exit_on_complete,
    )
    settle_gc()
    return worker.run()


def _child_argv(args: argparse.Namespace, index: int) -> list[str]:
    argv = [sys.executable, "-m", "tomqueue", *_log_argv(args), "worker"]
    argv += ["--threads", str(args.threads)]
    for module in args.imports:
        argv += ["--import", module]
    for queue in args.queues:
        argv += ["--queue", queue]
    for flag in ("min_priority", "max_priority"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.exit_on_complete:
        argv.append("--exit-on-complete")
    if args.metrics_port:
        argv += ["--metrics-port", str(args.metrics_port + index)]
    return argv


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _child_setup() -> None:
    """In a new child: take TERM/INT again (the parent blocks them while it spawns) and get
    SIGTERM if the supervising parent dies (Linux), so a child is never orphaned."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _spawn(args: argparse.Namespace, index: int) -> subprocess.Popen[bytes]:
    # Own session: a TERM sent to the parent's process group (supervisord stopasgroup) must
    # reach each child once, through the parent, or the child would see a "second signal".
    # TERM/INT are blocked meanwhile, so a signal cannot slip between spawn and bookkeeping.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return subprocess.Popen(
            _child_argv(args, index), start_new_session=True, preexec_fn=_child_setup
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _exit_status(code: int, signalled: bool) -> int:
    """A child's exit as a shell would report it; 0 for a stop we asked for."""
    if signalled and code in (0, -signal.SIGTERM, -signal.SIGINT, 130, 143):
        return 0
    return 128 - code if code < 0 else code


def _supervise(args: argparse.Namespace) -> int:
    """``-n N``: run N single-process workers, restart any that die, forward signals."""
    children = [_spawn(args, i) for i in range(args.processes)]
    received: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        for i, child in enumerate(children):
            code = child.poll()
            if code is not None and not received and (code != 0 or not args.exit_on_complete):
                log.warning("worker pid %s exited with %s; starting another", child.pid, code)
                children[i] = _spawn(args, i)
                for signum in received:  # a signal that came during the spawn
                    children[i].send_signal(signum)
        if all(c.poll() is not None for c in children) and (received or args.exit_on_complete):
            break
        time.sleep(0.1)
    statuses = [_exit_status(c.wait(), bool(received)) for c in children]
    return next((s for s in statuses if s), 0)


def cmd_deferred(args: argparse.Namespace) -> int:
    from deferred.manager import main as deferred_main

    return int(deferred_main(_log_argv(args) + args.options))


def _log_argv(args: argparse.Namespace) -> list[str]:
    """The logging options given to this process, for a process it starts."""
    argv = ["-v"] if args.verbose else []
    if args.log_format:
        argv += ["--log-format", args.log_format]
    if args.log_config:
        argv += ["--log-config", args.log_config]
    return argv


def cmd_republish(args: argparse.Namespace) -> int:
    from tomqueue.sweeper import republish

    count = republish(_config(), everything=args.all, echo=_say)
    print(f"republished {count} notification(s)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tomqueue.status import main as status_main

    return int(status_main(args))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tomqueue", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_log_options(p, None)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("migrate", help="create or upgrade the schema")
    m.set_defaults(func=cmd_migrate)
    _worker_parser(sub.add_parser("worker", help="run jobs"))
    # the deferred manager parses its own options (python -m deferred --help)
    d = sub.add_parser("deferred", help="run the deferred manager", add_help=False)
    d.set_defaults(func=cmd_deferred, options=[])
    r = sub.add_parser("republish", help="publish notifications again for due jobs")
    r.add_argument("--all", action="store_true", help="every unfailed, unlocked job")
    r.set_defaults(func=cmd_republish)
    s = sub.add_parser("status", help="queues, jobs and workers")
    s.add_argument("--json", action="store_true")
    s.add_argument(
        "--max-age",
        type=float,
        default=None,
        help="exit 2 if the oldest ready job waited longer (seconds)",
    )
    s.set_defaults(func=cmd_status)
    # on each subcommand too (SUPPRESS: not given there keeps the main parser's value), so
    # both "tomqueue --log-format json worker" and "tomqueue worker --log-format json" work
    for command in (m, r, s):
        add_log_options(command, argparse.SUPPRESS)
    return p


def _worker_parser(w: argparse.ArgumentParser) -> None:
    w.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="module whose job classes this worker may load (repeatable)",
    )
    w.add_argument("-n", "--processes", type=int, default=1, help="worker processes")
    w.add_argument("--threads", type=int, default=1, help="job threads per process")
    w.add_argument(
        "--queue",
        "--queues",
        dest="queues",
        action="append",
        default=[],
        metavar="Q",
        help="Delayed::Job queue to work (repeatable; default: the default queue)",
    )
    w.add_argument("--min-priority", type=int, default=None)
    w.add_argument("--max-priority", type=int, default=None)
    w.add_argument("--exit-on-complete", action="store_true", help="exit when no job is ready")
    w.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on 127.0.0.1:PORT (with -n, PORT+i)",
    )
    add_log_options(w, argparse.SUPPRESS)
    w.set_defaults(func=cmd_worker)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if args.command == "deferred":
        args.options = extra  # everything after "deferred" is the manager's
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command != "deferred":  # the manager sets up its own logging
            setup_logging(args.log_format, args.log_config, args.verbose)
        return int(args.func(args))
    except TomQueueError as exc:
        print(f"tomqueue {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
