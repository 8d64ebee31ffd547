"""The command line of the chaos run, and its help."""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

import chaos

HELP = (
    (chaos.__doc__ or "").split("\n\nRun it as")[0]
    + """

What is counted (per appointment: each gives exactly one expected notification, key
ehr:appointment-booked:<appointment id>|booked|<start>|<patient id>):
  sent once            the sandbox accepted its email exactly once
  duplicates           the sandbox accepted it more than once                       -> exit 1
  lost                 the sandbox never accepted it, and the ledger does not show it as
                       in_doubt or failed with a reason (missing row, sent, skipped, cancelled) -> exit 1
  unfinished           still pending/sending in the ledger when the timeout passed  -> exit 3
  in_doubt             ledger state in_doubt (visible to a person: not a loss); split into
                       accepted by the sandbox (a webhook was dropped or missed) and never accepted
  resolved by webhook  ledger reason "confirmed by a Paubox webhook"
  failed, skipped      ledger states, with their reasons grouped

Faults (per send request the sandbox draws one; rates are fractions):
  --server-error       HTTP 500, message not accepted (default 0.025)
  --accepted-500       message accepted, then HTTP 500 (default 0.025; with the above: 5 % HTTP 500)
  --rate-limit         HTTP 429 with Retry-After: 1 (default 0.02)
  --hang               accepted, then no answer for --hang-seconds (default 0.01); the daemons' read
                       timeout is 2 s, so the notification becomes in_doubt until a webhook confirms it
  --drop-webhook       a webhook event is never sent (default 0.01)
Webhooks go to replica 1 only; while it is down (killed) they are lost too, as with Paubox.

Files in the work folder: fhir-data/ (the generated resources), mappings/ (appointment-booked only),
config-<i>.yaml and replica-<i>.log per daemon, fhir-server.log, paubox-sandbox.log, connector.db
(SQLite), ledger.csv (key, state, reason, attempts, resends, tracking id, times the sandbox accepted it),
result.txt (the table), run.json (the options, with the seed).

Exit status: 0 no duplicate and nothing lost; 1 a duplicate or a loss; 2 bad options or a setup
failure; 3 the timeout passed with notifications unfinished; 130 interrupted.

Notes: the seed fixes the data, the fault sequence and the kill plan, not the timing, so a run is
not exactly repeatable. A daemon killed with SIGKILL leaves its claimed notifications leased for
`dispatch.lease` (20 s in the config the chaos run writes) before another daemon takes them (pending) or
marks them in_doubt (sending); a restarted SQLite daemon takes them back at once (it is the only one).
"""
)


def rate(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction between 0 and 1")
    return number


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/chaos", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run = parser.add_argument_group("the run")
    run.add_argument(
        "--appointments",
        type=positive,
        default=200,
        metavar="N",
        help="generated booked appointments, one patient each (default 200)",
    )
    run.add_argument(
        "--kills",
        type=int,
        default=5,
        metavar="K",
        help="SIGKILLs of a random daemon at random moments while sending, each followed by a restart (default 5)",
    )
    run.add_argument(
        "--replicas",
        type=positive,
        default=1,
        metavar="R",
        help="`connector run` daemons sharing the ledger; more than 1 needs --postgres (default 1)",
    )
    run.add_argument(
        "--postgres",
        action="store_true",
        help="ledger on PostgreSQL (database `test` on 127.0.0.1:5432, user postgres, trust auth, or "
        "CONNECTOR_TEST_PG_URL) in a fresh schema, dropped at the end; default: SQLite in the work folder",
    )
    run.add_argument("--keep-schema", action="store_true", help="with --postgres: do not drop the schema")
    run.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for the data, the sandbox's faults and the kill plan (default: random, printed)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=900,
        metavar="SECONDS",
        help="give up waiting for final states after this long (default 900); stopping adds at most about a minute",
    )
    run.add_argument("--batch-size", type=positive, default=50, help="dispatch.batch_size of the daemons (default 50)")
    run.add_argument(
        "--concurrency",
        type=positive,
        default=8,
        help="dispatch.concurrency of the daemons: send requests in flight per daemon (default 8)",
    )
    run.add_argument(
        "--bulk",
        type=int,
        choices=range(51),
        default=0,
        metavar="N",
        help="dispatch.bulk of the daemons: messages per bulk request, 0 one by one (default 0; the product's is 5)",
    )
    run.add_argument(
        "--page-size", type=positive, default=100, help="sources.ehr.page_size of the daemons (default 100)"
    )
    run.add_argument(
        "--settle",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="wait this long for webhooks after the last notification is final (default 3)",
    )
    faults = parser.add_argument_group("sandbox faults (fractions of send requests)")
    faults.add_argument("--latency-ms", type=float, default=50, help="delay of every send (default 50)")
    faults.add_argument("--server-error", type=rate, default=0.025, help="HTTP 500, not accepted (default 0.025)")
    faults.add_argument("--accepted-500", type=rate, default=0.025, help="accepted, then HTTP 500 (default 0.025)")
    faults.add_argument("--rate-limit", type=rate, default=0.02, help="HTTP 429, Retry-After: 1 (default 0.02)")
    faults.add_argument("--hang", type=rate, default=0.01, help="accepted, then no answer (default 0.01)")
    faults.add_argument("--hang-seconds", type=float, default=10, help="how long a hang lasts (default 10)")
    faults.add_argument("--drop-webhook", type=rate, default=0.01, help="webhook event never sent (default 0.01)")
    args = parser.parse_args(argv)
    if args.replicas > 1 and not args.postgres:
        parser.error("--replicas above 1 needs --postgres: a SQLite ledger serves one process")
    if args.kills < 0:
        parser.error("--kills must be 0 or more")
    if args.server_error + args.accepted_500 + args.rate_limit + args.hang > 1:
        parser.error("the fault rates add up to more than 1")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10**6)
    return args
