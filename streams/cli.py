"""The ``gradeflow`` command line: worker, topics, rules."""

from __future__ import annotations

import argparse
import sys

from schemas.errors import GradeflowError, RulesetError, ServerUnavailable
from streams import __version__


def _settings(args: argparse.Namespace):  # noqa: ANN202 - Settings imported lazily (Faust is slow to import)
    from streams.settings import load_settings

    return load_settings(
        kafka_bootstrap=getattr(args, "bootstrap", None),
        ruleset=getattr(args, "ruleset", None),
        app_id=getattr(args, "app_id", None),
        web_port=getattr(args, "web_port", None),
        log_level=getattr(args, "loglevel", None),
    )


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a worker until stopped."""
    from rules.engine import compile_ruleset
    from rules.ruleset import load
    from streams.topics import admin_client, create_topics

    settings = _settings(args)
    ruleset = compile_ruleset(load(settings.ruleset))
    admin_client(settings, timeout_s=5.0).close()
    create_topics(settings)

    from faust import Worker

    from streams.app import create_app

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings, ruleset)
    print(f"gradeflow worker: ruleset {ruleset.id}@{ruleset.version}, broker {settings.kafka_bootstrap}, "
          f"app {settings.app_id}", file=sys.stderr, flush=True)
    Worker(app, loglevel=settings.log_level).execute_from_commandline()
    return 0


def cmd_topics_create(args: argparse.Namespace) -> int:
    """Create every topic gradeflow uses (idempotent)."""
    from streams.topics import create_topics

    created = create_topics(_settings(args))
    print("created: " + ", ".join(created) if created else "all topics already exist")
    return 0


def cmd_rules_check(args: argparse.Namespace) -> int:
    """Validate rule files; print what is wrong; exit 1 if any is bad."""
    from rules.ruleset import load

    bad = 0
    for name in args.files:
        try:
            rs = load(name)
            print(f"ok: {name} ({rs.id}@{rs.version}, ladders: {', '.join(rs.ladders)})")
        except RulesetError as exc:
            bad += 1
            for problem in exc.problems:
                print(f"{exc.source}: {problem}", file=sys.stderr)
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gradeflow``."""
    parser = argparse.ArgumentParser(prog="gradeflow", description="Real-time customer grading on Kafka.")
    parser.add_argument("--version", action="version", version=f"gradeflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def broker_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bootstrap", "-b", help="Kafka bootstrap servers (GRADEFLOW_KAFKA_BOOTSTRAP)")
        p.add_argument("--app-id", help="consumer group / app id (GRADEFLOW_APP_ID)")

    worker = sub.add_parser("worker", help="run a grading worker")
    broker_opts(worker)
    worker.add_argument("--ruleset", "-r", help="preset name or rule file (GRADEFLOW_RULESET), default rfm-5")
    worker.add_argument("--web-port", type=int, help="HTTP port (GRADEFLOW_WEB_PORT)")
    worker.add_argument("--loglevel", "-l", help="log level (GRADEFLOW_LOG_LEVEL)")
    worker.set_defaults(func=cmd_worker)

    topics = sub.add_parser("topics", help="manage gradeflow's topics").add_subparsers(dest="action", required=True)
    create = topics.add_parser("create", help="create every topic gradeflow uses")
    broker_opts(create)
    create.set_defaults(func=cmd_topics_create)

    rules = sub.add_parser("rules", help="work with rule files").add_subparsers(dest="action", required=True)
    check = rules.add_parser("check", help="validate rule files")
    check.add_argument("files", nargs="+")
    check.set_defaults(func=cmd_rules_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradeflow`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ServerUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except RulesetError as exc:
        for problem in exc.problems:
            print(f"{exc.source}: {problem}", file=sys.stderr)
        return 1
    except GradeflowError as exc:
        print(f"gradeflow: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
