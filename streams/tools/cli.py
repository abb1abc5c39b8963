"""The ``gradeflow`` command line: worker, topics, rules, explain."""

from __future__ import annotations

import argparse
import sys

from schemas.errors import GradeflowError, RulesetError, ServerUnavailable
from streams import __version__

READY_LINE = "gradeflow: worker ready (tables recovered, consuming)"


def _settings(args: argparse.Namespace):  # noqa: ANN202 - Settings imported lazily (Faust is slow to import)
    from streams.settings import load_settings

    return load_settings(
        kafka_bootstrap=getattr(args, "bootstrap", None),
        ruleset=getattr(args, "ruleset", None),
        app_id=getattr(args, "app_id", None),
        web_port=getattr(args, "web_port", None),
        log_level=getattr(args, "loglevel", None),
        redis_url=getattr(args, "redis_url", None),
        redis_prefix=getattr(args, "redis_prefix", None),
        **{name: getattr(args, name, None) for name in _CONNECTION_OPTIONS},
    )


# Kafka connection and topic layout options, shared by `worker` and `topics`: --kafka-x-y sets kafka_x_y.
# There is no option for the password itself (it would show in `ps`): use the env or a file.
_CONNECTION_OPTIONS = {
    "kafka_security_protocol": ("--security-protocol", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL", str),
    "kafka_sasl_mechanism": ("--sasl-mechanism", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", str),
    "kafka_sasl_username": ("--sasl-username", "SASL user", str),
    "kafka_sasl_password_file": ("--sasl-password-file", "file holding the SASL password", str),
    "kafka_ssl_ca_file": ("--ssl-ca-file", "PEM CA file that signed the brokers' certificates", str),
    "kafka_ssl_cert_file": ("--ssl-cert-file", "PEM client certificate (mutual TLS)", str),
    "kafka_ssl_key_file": ("--ssl-key-file", "PEM client key (mutual TLS)", str),
    "kafka_client_id": ("--client-id", "Kafka client.id", str),
    "topic_prefix": ("--topic-prefix", "prefix of every topic name and of the app id", str),
    "partitions": ("--partitions", "partitions of inputs and changelogs", int),
    "replication_factor": ("--replication-factor", "replication factor of every topic (default: the cluster's "
                                                   "default.replication.factor)", int),
    "min_insync_replicas": ("--min-insync-replicas", "min.insync.replicas of every topic", int),
}


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a worker until stopped."""
    from streams.faustext import check_versions

    # Before anything talks to the broker: a worker on an untested Faust or aiokafka is refused
    # (importing streams.faustext checks too, but only the first time in a process).
    check_versions()
    from rules.engine import compile_ruleset
    from rules.ruleset import load
    from streams.kafka_config import describe_connection
    from streams.topics import admin_client, check_topics, cluster_default_replication_factor, create_topics

    settings = _settings(args)
    ruleset = compile_ruleset(load(settings.ruleset))
    from streams.shadow import load_shadows

    shadows = load_shadows(settings, ruleset)  # refused here, before anything starts, if one cannot run
    admin = admin_client(settings, timeout_s=5.0)
    warnings: list[str] = []
    try:
        if settings.create_topics:
            create_topics(settings, admin)
        problems = check_topics(settings, admin, warnings=warnings)
        if settings.replication_factor is None:
            # The topics Faust and the worker create themselves (its group leader's, the alert retries',
            # the population's) get the cluster's default too, as a number: their clients cannot ask for -1.
            settings = settings.model_copy(
                update={"replication_factor": cluster_default_replication_factor(admin)})
    finally:
        admin.close()
    for warning in warnings:
        print(f"gradeflow: topic check: {warning}", file=sys.stderr)
    if problems:
        # The worker refuses a layout that would lose or misplace state.
        for problem in problems:
            print(f"gradeflow: topic check: {problem}", file=sys.stderr)
        print(f"gradeflow worker: refusing to start on this topic layout ({len(problems)} problem(s), "
              f"see `gradeflow topics check`)", file=sys.stderr)
        return 1

    from faust import Worker

    from streams.app import create_app
    from streams.memory import fix_mmap_threshold, limit_malloc_arenas, raise_collector_threshold

    limit_malloc_arenas(settings.malloc_arena_max)  # before Faust starts its threads
    fix_mmap_threshold(settings.malloc_mmap_threshold)
    raise_collector_threshold(settings.gc_threshold)

    from streams.rules_control import choose_start, read_control

    # Before anything is graded: a promoted ruleset wins over GRADEFLOW_RULESET (docs/rules-lifecycle.md).
    record, offset = read_control(settings)
    start = choose_start(ruleset, record, offset)
    if start.note:
        print(start.note, file=sys.stderr, flush=True)
    ruleset = start.ruleset
    from streams.shadow import beside

    shadows, dropped = beside(ruleset, shadows)  # a promoted shadow is the active ruleset now
    for why in dropped:
        print(f"gradeflow worker: shadow ruleset {why}: not graded beside the active {ruleset.key}",
              file=sys.stderr, flush=True)

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings, ruleset, shadows, start)
    from schemas.compiled import status as hot_path

    print(f"gradeflow worker: ruleset {ruleset.id}@{ruleset.version}"
          + "".join(f", shadow {rs.key}" for rs in shadows) + f", broker {describe_connection(settings)}, "
          f"app {settings.group_id}, hot path {_HOT_PATH[hot_path()]}", file=sys.stderr, flush=True)
    from streams.stopping import StopDeadline

    deadline = StopDeadline(settings.stop_timeout_s)

    class GradeflowWorker(Worker):
        def _on_sigterm(self) -> None:
            deadline.arm()
            super()._on_sigterm()

        def _on_sigint(self) -> None:
            deadline.arm()
            super()._on_sigint()

        async def on_startup_finished(self) -> None:
            await super().on_startup_finished()
            # Printed whatever the log level: scripts and tests wait for it.
            print(READY_LINE, file=sys.stderr, flush=True)

    GradeflowWorker(app, loglevel=settings.log_level).execute_from_commandline()
    return 0


# schemas/compiled.py's status, as the worker's start line says it.
_HOT_PATH = {"compiled": "compiled (mypyc)", "stale": "plain Python (the compiled build is stale: make compile)",
             "absent": "plain Python (not compiled: make compile)"}


def cmd_topics_create(args: argparse.Namespace) -> int:
    """Create every topic gradeflow uses (idempotent)."""
    from streams.topics import create_topics

    settings = _settings(args)
    created = create_topics(settings)
    print("created: " + ", ".join(created) if created else "all topics already exist")
    return 0


def cmd_topics_check(args: argparse.Namespace) -> int:
    """Compare the cluster's topics with what gradeflow needs; name each difference; exit 1 if any."""
    from streams.topics import check_topics, topic_specs

    settings = _settings(args)
    warnings: list[str] = []
    problems = check_topics(settings, warnings=warnings)
    for warning in warnings:
        print(warning, file=sys.stderr)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s); `gradeflow topics create` creates missing topics, "
              f"the others need kafka-topics/kafka-configs (see docs/deploy.md)", file=sys.stderr)
        return 1
    rf = (f">= {settings.replication_factor}" if settings.replication_factor is not None
          else "the cluster's default")
    print(f"ok: {len(topic_specs(settings))} topics match (partitions {settings.partitions}, "
          f"replication factor {rf}, min.insync.replicas >= {settings.min_insync_replicas})")
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


def cmd_rules_promote(args: argparse.Namespace) -> int:
    """Make a ruleset the active one on every worker; with --wait, follow the re-grade."""
    from streams.tools.promote import promote

    settings = _settings(args)
    record = promote(settings, args.candidate)
    return _wait(settings, record, args)


def cmd_rules_rollback(args: argparse.Namespace) -> int:
    """Return every worker to the ruleset active before the current one."""
    from streams.tools.promote import rollback

    settings = _settings(args)
    return _wait(settings, rollback(settings), args)


def _wait(settings, record, args: argparse.Namespace) -> int:  # noqa: ANN001 - Settings imported lazily
    from streams.tools.promote import wait

    if record is None or not args.wait:
        return 0
    if wait(settings, record, args.timeout, quiet=args.quiet):
        print(f"gradeflow: every customer is graded by {record.ruleset.id}@{record.ruleset.version}", file=sys.stderr)
        return 0
    print(f"gradeflow: the re-grade was not complete after {args.timeout:g} s (are the workers running? "
          f"GET /rules on each says how far it is)", file=sys.stderr)
    return 3


def cmd_redis_rebuild(args: argparse.Namespace) -> int:
    """Rebuild the Redis current grades from the grade-changes topic (never moves a grade backwards)."""
    from streams.downstream.redis_grades import rebuild
    from streams.settings import redis_prefix

    from streams.settings import redact

    settings = _settings(args)  # --redis-url and --redis-prefix validated like the environment
    try:
        stats = rebuild(settings, clear_first=args.clear, fill_tables=not args.no_tables)
    except Exception as exc:  # noqa: BLE001 - Redis or broker unreachable: one line
        print(redact(f"gradeflow: redis rebuild failed: {type(exc).__name__}: {exc}", settings), file=sys.stderr)
        return 1
    print(f"redis rebuild of {settings.topics.grade_changes} into {settings.redis_url} (prefix {redis_prefix(settings)}): "
          + " ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    """Print every setting as the worker would read it, secrets masked."""
    from streams.settings import describe_settings

    for name, value in describe_settings(_settings(args)):
        print(f"GRADEFLOW_{name.upper()}={value}")
    return 0


def cmd_rules_explain(args: argparse.Namespace) -> int:
    """The metrics and the rule that decided each grade of one customer, at the end of a history."""
    from rules.engine import compile_ruleset
    from rules.ruleset import load
    from streams.tools.rules_tools import explain

    code, text = explain(compile_ruleset(load(args.file)), args.events, args.customer)
    print(text, file=sys.stdout if code == 0 else sys.stderr)
    return code


def cmd_explain(args: argparse.Namespace) -> int:
    """A customer's grade on each ladder at an instant, the change that set it and the next, from a live cluster."""
    import orjson

    from schemas.errors import InvalidEvent
    from schemas.timestamps import parse_rfc3339
    from streams.tools.explain import explain, fetch, render

    try:
        at = parse_rfc3339(args.at, "--at")
    except InvalidEvent as exc:
        print(f"gradeflow explain: {exc.message} (RFC 3339 with an offset, e.g. 2026-05-15T10:00:00+08:00)",
              file=sys.stderr)
        return 2
    settings = _settings(args)
    host = "127.0.0.1" if settings.web_host in ("0.0.0.0", "::", "") else settings.web_host
    api = args.api or f"http://{host}:{settings.web_port}"
    token = settings.api_token.get_secret_value() if settings.api_token else None
    result = explain(fetch(api, args.customer, token, args.ladder), at)
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render(result))
    return 0


def cmd_rules_try(args: argparse.Namespace) -> int:
    """Grade distribution per ladder over a history and, against another ruleset, who would move."""
    from rules.engine import compile_ruleset
    from rules.ruleset import load
    from streams.tools.rules_tools import try_ruleset

    against = compile_ruleset(load(args.against)) if args.against else None
    print(try_ruleset(compile_ruleset(load(args.file)), args.events, against, report=args.report))
    if args.report:
        print(f"report: {args.report}")
    return 0


def cmd_rules_diff(args: argparse.Namespace) -> int:
    """The blast radius of promoting CANDIDATE: live from the shadow state, or offline over a history."""
    import json

    from rules.diff import render
    from rules.engine import compile_ruleset
    from rules.ruleset import load

    settings = _settings(args)
    active = compile_ruleset(load(settings.ruleset))
    candidate = compile_ruleset(load(args.candidate))
    if args.against:
        from streams.tools.rules_tools import diff_offline

        doc = diff_offline(active, candidate, args.against, args.sample)
    else:
        from streams.shadow_diff import live_diff, read_records

        doc = live_diff(read_records(settings), active, candidate, args.sample)
    print(json.dumps(doc, ensure_ascii=False, indent=2) if args.json else render(doc))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Read the input topics and grade-changes, recompute offline with the same engine, report agreement."""
    from rules.engine import compile_ruleset
    from rules.ruleset import load
    from streams.tools.audit import Audit, read_cluster, read_erasures, read_merges

    settings = _settings(args)
    ruleset = compile_ruleset(load(args.ruleset or settings.ruleset))
    bar = None
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(desc="audit", unit="records", file=sys.stderr)
    try:
        inputs, changes, alerts = read_cluster(settings, bar.update if bar is not None else None)
        if bar is not None:
            bar.set_description("audit: recomputing")
        audit = Audit(ruleset, clock=settings.clock, allowed_lateness_days=settings.allowed_lateness_days,
                      max_future_skew_s=settings.max_future_skew_s, erasures=read_erasures(settings),
                      merges=read_merges(settings))
        report = audit.check(inputs, changes, alerts, bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    print(f"gradeflow audit of {settings.topics.grade_changes} against {len(inputs)} input records "
          f"(ruleset {ruleset.id}@{ruleset.version}, clock {settings.clock})")
    print(report.render())
    return 0 if report.ok else 1


def cmd_replay(args: argparse.Namespace) -> int:
    """Produce a history into the input topics; with --wait, until the worker has graded it."""
    from streams.tools.replay import replay, wait_graded

    settings = _settings(args)
    done = replay(settings, args.history, rate=args.rate, progress=not args.quiet)
    print(f"replayed {done.sent} events ({done.transactions} to {settings.topics.transactions}, {done.interactions} "
          f"to {settings.topics.interactions}) in {done.seconds:.1f} s")
    if args.wait:
        if not wait_graded(settings, args.timeout, progress=not args.quiet):
            print(f"gradeflow replay: group {settings.group_id} had not graded everything after {args.timeout:g} s",
                  file=sys.stderr)
            return 1
        print(f"graded: group {settings.group_id} committed every input record")
    return 0


def cmd_customers_erase(args: argparse.Namespace) -> int:
    """Request the erasure of customers; with --wait, wait until every receipt is on erasure-receipts."""
    from streams.tools.erase import request_erasures, wait_receipts

    settings = _settings(args)
    ids, start = request_erasures(settings, args.customer_ids)
    for erasure_id, customer_id in ids.items():
        print(f"erasure {erasure_id} requested: {customer_id}")
    if not args.wait:
        return 0
    receipts = wait_receipts(settings, set(ids), start, args.timeout)
    for erasure_id, doc in receipts.items():
        removed = doc["removed"]
        held = "state removed" if removed["state_partition"] is not None else "no state held"
        print(f"erasure {erasure_id} done: {held}, tombstones on {', '.join(removed['output_tombstones']) or 'none'}, "
              f"{removed['redis_keys']} Redis entries removed")
    missing = set(ids) - set(receipts)
    if missing:
        print(f"gradeflow customers erase: no receipt after {args.timeout:g} s for {len(missing)} of {len(ids)} "
              f"erasures (are workers running with GRADEFLOW_ERASURE_KEY?); they stay requested", file=sys.stderr)
        return 1
    return 0


def cmd_customers_merge(args: argparse.Namespace) -> int:
    """Request the merge of FROM into INTO; with --wait, wait for its outcome."""
    from streams.tools.merge import request_merge, wait_outcome

    settings = _settings(args)
    merge_id, start = request_merge(settings, args.from_id, args.into_id)
    print(f"merge {merge_id} requested: {args.from_id} into {args.into_id}")
    if not args.wait:
        return 0
    outcome = wait_outcome(settings, merge_id, start, args.timeout)
    if outcome is None:
        print(f"gradeflow customers merge: no outcome after {args.timeout:g} s (are workers running with "
              f"GRADEFLOW_CUSTOMER_MERGES=true?); it stays requested", file=sys.stderr)
        return 1
    if outcome["step"] == "refused":
        print(f"merge {merge_id} refused: {outcome.get('reason')}", file=sys.stderr)
        return 1
    print(f"merge {merge_id} done: {args.from_id} ended (grade none), {args.into_id} re-graded")
    return 0


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gradeflow``."""
    parser = argparse.ArgumentParser(prog="gradeflow", description="Real-time customer grading on Kafka.")
    parser.add_argument("--version", action="version", version=f"gradeflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def broker_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bootstrap", "-b", help="Kafka bootstrap servers (GRADEFLOW_KAFKA_BOOTSTRAP)")
        p.add_argument("--app-id", help="consumer group / app id (GRADEFLOW_APP_ID)")
        for dest, (flag, text, kind) in _CONNECTION_OPTIONS.items():
            p.add_argument(flag, dest=dest, type=kind, help=f"{text} (GRADEFLOW_{dest.upper()})")

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
    tcheck = topics.add_parser("check", help="compare the cluster's topics with what gradeflow needs (exit 0/1)")
    broker_opts(tcheck)
    tcheck.set_defaults(func=cmd_topics_check)

    rules = sub.add_parser("rules", help="work with rule files").add_subparsers(dest="action", required=True)
    check = rules.add_parser("check", help="validate rule files")
    check.add_argument("files", nargs="+")
    check.set_defaults(func=cmd_rules_check)
    explain = rules.add_parser("explain", help="metrics and deciding rule of each grade of one customer, offline")
    explain.add_argument("file", help="preset name or rule file")
    explain.add_argument("--events", required=True, help="history: JSON Lines of transactions and interactions")
    explain.add_argument("--customer", required=True, help="customer_id to explain")
    explain.set_defaults(func=cmd_rules_explain)
    trial = rules.add_parser("try", help="grade distribution over a history, offline, with the worker's code")
    trial.add_argument("file", help="preset name or rule file")
    trial.add_argument("--events", required=True, help="history: JSON Lines of transactions and interactions")
    trial.add_argument("--against", help="another ruleset: how many customers would move from which grade to which")
    trial.add_argument("--report", help="also write an HTML report (inline SVG, no network) with the grade "
                                        "distribution and, with --against, the from-to flows")
    trial.set_defaults(func=cmd_rules_try)

    rdiff = rules.add_parser("diff", help="what promoting a candidate ruleset would do: from-to matrix, key "
                                          "customers downgraded, alerts, distribution (live from the shadow state)")
    broker_opts(rdiff)
    rdiff.add_argument("candidate", help="preset name or rule file of the candidate (a shadow ruleset, for the live "
                                         "answer)")
    rdiff.add_argument("--ruleset", "-r", help="the active ruleset (GRADEFLOW_RULESET), default rfm-5")
    rdiff.add_argument("--against", help="offline instead: a history (JSON Lines) both rulesets are run over")
    rdiff.add_argument("--sample", type=int, default=10, help="key customers downgraded shown per ladder (10)")
    rdiff.add_argument("--json", action="store_true", help="print the answer as JSON (as GET /rules/diff gives it)")
    rdiff.set_defaults(func=cmd_rules_diff)
    promote_cmd = rules.add_parser("promote", help="make a ruleset the active one on every worker (re-grades "
                                                   "every customer; docs/rules-lifecycle.md)")
    broker_opts(promote_cmd)
    promote_cmd.add_argument("candidate", help="preset name or rule file, with a version no worker ran under "
                                               "another document")
    rollback_cmd = rules.add_parser("rollback", help="return every worker to the ruleset active before")
    broker_opts(rollback_cmd)
    for p in (promote_cmd, rollback_cmd):
        p.add_argument("--ruleset", "-r", help="what the workers run when nothing was ever promoted "
                                               "(GRADEFLOW_RULESET), default rfm-5")
        p.add_argument("--wait", action="store_true",
                       help="then show the re-grade's progress until every input partition is done (exit 3 if not "
                            "within --timeout)")
        p.add_argument("--timeout", type=_positive, default=600.0, help="seconds --wait waits at most (600)")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    promote_cmd.set_defaults(func=cmd_rules_promote)
    rollback_cmd.set_defaults(func=cmd_rules_rollback)

    replay = sub.add_parser("replay", help="produce a history (JSON Lines) into the input topics, with progress")
    broker_opts(replay)
    replay.add_argument("history", help="JSON Lines of transactions and interactions, in the order to send them")
    replay.add_argument("--rate", type=_positive, help="events per second (default: as fast as possible)")
    replay.add_argument("--wait", action="store_true",
                        help="then wait until the worker's group has committed every input record")
    replay.add_argument("--timeout", type=_positive, default=600.0, help="seconds --wait waits at most (600)")
    replay.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    replay.set_defaults(func=cmd_replay)

    show = sub.add_parser("settings", help="print the settings a worker would run with (secrets masked)")
    broker_opts(show)
    show.set_defaults(func=cmd_settings)

    redis_cmd = sub.add_parser("redis", help="the Redis copy of current grades").add_subparsers(dest="action",
                                                                                             required=True)
    rebuild = redis_cmd.add_parser("rebuild", help="rebuild Redis from the grade-changes topic (from its beginning)")
    broker_opts(rebuild)
    rebuild.add_argument("--redis-url", help="Redis URL (GRADEFLOW_REDIS_URL); a password here shows in the "
                                             "process list: prefer the environment")
    rebuild.add_argument("--redis-prefix", help="key prefix (GRADEFLOW_REDIS_PREFIX), default the app id")
    rebuild.add_argument("--clear", action="store_true", help="delete the current-grade keys first")
    rebuild.add_argument("--no-tables", action="store_true",
                         help="do not fill ladders the compacted topic lost from the table changelog")
    rebuild.set_defaults(func=cmd_redis_rebuild)

    why = sub.add_parser("explain", help="a customer's grade on each ladder at an instant, the change that set it "
                                         "(cause, ruleset, metrics, reasons) and the next one, from a worker's API")
    why.add_argument("--customer", required=True, help="customer_id")
    why.add_argument("--at", required=True, help="the instant, RFC 3339 with an offset (2026-05-15T10:00:00+08:00)")
    why.add_argument("--ladder", help="only this ladder")
    why.add_argument("--api", help="the HTTP API's base URL (default http://GRADEFLOW_WEB_HOST:GRADEFLOW_WEB_PORT); "
                                   "the token comes from GRADEFLOW_API_TOKEN")
    why.add_argument("--json", action="store_true", help="one JSON document instead of text")
    why.set_defaults(func=cmd_explain)

    customers = sub.add_parser("customers", help="customer lifecycle").add_subparsers(dest="action", required=True)
    erase = customers.add_parser("erase", help="erase customers everywhere gradeflow keeps them (docs/erasure.md)")
    broker_opts(erase)
    erase.add_argument("customer_ids", nargs="+", metavar="ID", help="customer id")
    erase.add_argument("--wait", action="store_true", help="wait for every erasure's receipt (exit 1 if one is missing)")
    erase.add_argument("--timeout", type=_positive, default=120.0, help="seconds --wait waits (default 120)")
    erase.set_defaults(func=cmd_customers_erase)
    merge = customers.add_parser("merge", help="merge customer id FROM into INTO: one customer from then on "
                                               "(docs/customers.md)")
    broker_opts(merge)
    merge.add_argument("from_id", metavar="FROM", help="the id that ends")
    merge.add_argument("into_id", metavar="INTO", help="the id that stays, with the events of both")
    merge.add_argument("--wait", action="store_true", help="wait for the outcome (exit 1 if refused or none)")
    merge.add_argument("--timeout", type=_positive, default=120.0, help="seconds --wait waits (default 120)")
    merge.set_defaults(func=cmd_customers_merge)

    audit = sub.add_parser("audit", help="check grade-changes and alerts against an offline run of the input topics "
                                          "(exit 1 on any divergence)")
    broker_opts(audit)
    audit.add_argument("--ruleset", "-r", help="preset name or rule file (GRADEFLOW_RULESET), default rfm-5")
    audit.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    audit.set_defaults(func=cmd_audit)
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
