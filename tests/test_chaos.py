"""The chaos run (the `chaos` package, `./scripts/chaos`) in a small configuration: random Paubox faults and
daemons killed with SIGKILL never make an email go twice, and never make one silently go missing."""

from __future__ import annotations

import re

import pytest

from chaos.options import parse_args
from chaos.run import main
from chaos.verdict import Row, analyse


def chaos(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run it in this process; fail with its whole output unless it exits 0. Returns the printed table."""
    status = main(list(args))
    output = capsys.readouterr()
    assert status == 0, f"the chaos run exited {status}\n{output.out}\n--- stderr ---\n{output.err}"
    return output.out


def count(table: str, label: str) -> int:
    match = re.search(rf"^  {label} +(\d+)", table, re.MULTILINE)
    assert match, f"no '{label}' row in the table:\n{table}"
    return int(match.group(1))


def key(aid: str) -> str:
    return f"ehr:appointment-booked:{aid}|booked|2030-01-01T10:00:00Z|p-{aid}"


def row(aid: str, state: str, reason: str | None = None) -> Row:
    return Row(key(aid), state, reason, 1, 0, None)


def test_verdict_counts_a_second_acceptance_as_a_duplicate_whatever_the_ledger_says() -> None:
    """The sandbox's count per key decides: twice is a duplicate, also for an in_doubt or failed row."""
    rows = [row("a", "sent"), row("b", "in_doubt", "HTTP 500"), row("c", "failed", "HTTP 400 Bad Request")]
    result = analyse(["a", "b", "c"], rows, {key("a"): 1, key("b"): 2, key("c"): 2})
    assert result.sent_once == 1
    assert result.duplicates == ["b", "c"]
    assert result.lost == []
    assert result.failed_but_accepted == 1
    assert result.exit_status() == 1


def test_verdict_in_doubt_or_failed_with_a_reason_is_visible_not_lost() -> None:
    """Never accepted and in_doubt, or failed with a reason: a person sees it, so it is not a loss."""
    rows = [row("a", "in_doubt", "interrupted while sending"), row("b", "failed", "HTTP 400 Bad Request")]
    result = analyse(["a", "b"], rows, {})
    assert result.lost == [] and result.duplicates == []
    assert (result.in_doubt_not_accepted, result.in_doubt_accepted) == (1, 0)
    assert result.exit_status() == 0


def test_verdict_missing_sent_skipped_or_failed_without_reason_never_accepted_is_lost() -> None:
    """No ledger row, a `sent` row, a `skipped` row or a `failed` row without a reason for an email the
    sandbox never accepted: silently missing."""
    rows = [row("b", "sent"), row("c", "skipped", "no email address"), row("d", "failed")]
    result = analyse(["a", "b", "c", "d"], rows, {})
    assert result.lost == ["a", "b", "c", "d"]
    assert result.exit_status() == 1


def test_verdict_pending_or_sending_at_the_end_is_unfinished_and_other_keys_are_counted_apart() -> None:
    """Rows still pending/sending make the run unfinished (exit 3), not lost; keys of appointments that were
    not generated, and the webhook-confirmed reason, are counted."""
    rows = [row("a", "pending"), row("b", "sending"), row("c", "sent", "confirmed by a Paubox webhook (x)")]
    result = analyse(["a", "b", "c"], rows, {key("c"): 1, "other-key": 1, key("zz"): 1})
    assert result.unfinished == ["a", "b"]
    assert result.lost == []
    assert result.resolved_by_webhook == 1
    assert result.unexpected_keys == 2
    assert result.exit_status() == 3


def test_options_refuse_several_replicas_on_sqlite(capsys: pytest.CaptureFixture[str]) -> None:
    """Several daemons need PostgreSQL: --replicas 3 without --postgres is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--replicas", "3"])
    assert exit_info.value.code == 2
    assert "needs --postgres" in capsys.readouterr().err


@pytest.mark.slow
def test_sqlite_daemon_killed_three_times_sends_every_email_exactly_once_or_reports_it_in_doubt(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """40 appointments, 5 % HTTP 500, 2 % 429, 1 % hangs, 1 % dropped webhooks, one daemon on SQLite killed
    with SIGKILL 3 times: no email accepted twice, none lost, every notification final."""
    table = chaos(capsys, "--appointments", "40", "--kills", "3", "--seed", "11", "--timeout", "80")
    assert count(table, "expected") == 40
    assert count(table, "duplicates") == 0
    assert count(table, "lost") == 0
    assert count(table, "unfinished") == 0
    assert count(table, "kills done") == 3


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_three_replicas_killed_three_times_send_every_email_exactly_once_or_report_it_in_doubt(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """60 appointments, the same faults, 3 daemons sharing a PostgreSQL ledger, random ones killed with
    SIGKILL 3 times: no email accepted twice, none lost. A killed daemon's claims wait for their 20 s
    lease (the chaos config's) before another daemon takes them."""
    table = chaos(
        capsys,
        "--appointments",
        "60",
        "--kills",
        "3",
        "--replicas",
        "3",
        "--postgres",
        "--seed",
        "12",
        "--timeout",
        "480",
    )
    assert count(table, "expected") == 60
    assert count(table, "duplicates") == 0
    assert count(table, "lost") == 0
    assert count(table, "unfinished") == 0
    assert count(table, "kills done") == 3
