"""Cohen et al.'s TSV format: writing, resuming, merging and analysing (drs_ext/io/results.py)."""

from __future__ import annotations

import datetime

import pytest

from drs_ext.io.results import (
    HEADER,
    TsvWriter,
    format_row,
    markdown_table,
    merge_tsv,
    plot_certified_accuracy,
    read_tsv,
    summarize,
)

# (idx, label, predict, radius, correct, seconds): one abstention (predict -1, radius 0).
ROWS = [
    (0, 3, 3, 0.912345, 1, 1.5),
    (1, 7, 1, 0.25, 0, 0.25),
    (2, 2, -1, 0.0, 0, 2.0),
    (3, 5, 5, 0.0123456, 1, 61.0),
    (4, 9, 9, 1.7, 1, 0.0),
]


def write_rows(path, rows=ROWS):
    with TsvWriter(path, overwrite=True) as writer:
        for row in rows:
            writer.write(*row)


def cohen_certify_line(i, label, prediction, radius, correct, seconds):
    # certify.py of Cohen et al. (2019), verbatim apart from the variable plumbing.
    time_elapsed = str(datetime.timedelta(seconds=seconds))
    line = "{}\t{}\t{}\t{:.3}\t{}\t{}"  # kept as .format: the point is to match it verbatim
    return line.format(i, label, prediction, radius, correct, time_elapsed)


def cohen_approximate_accuracy(path, radius):
    """Cohen et al.'s analyze.py ApproximateAccuracy without pandas: read by header name."""
    lines = path.read_text().splitlines()
    names = lines[0].split("\t")
    records = [dict(zip(names, line.split("\t"), strict=True)) for line in lines[1:]]
    hits = [int(r["correct"]) == 1 and float(r["radius"]) >= radius for r in records]
    return sum(hits) / len(hits)


def test_rows_are_byte_identical_to_cohen_certify(tmp_path):
    write_rows(tmp_path / "r.tsv")
    lines = (tmp_path / "r.tsv").read_text().split("\n")
    assert lines[0] == HEADER == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    assert lines[1:-1] == [cohen_certify_line(*row) for row in ROWS]
    assert lines[-1] == ""  # every row ends with a newline
    assert format_row(3, 5, 5, 0.0123456, True, 61.0).split("\t")[3:] == ["0.0123", "1", "0:01:01"]


def test_cohen_analysis_reads_our_files(tmp_path):
    write_rows(tmp_path / "r.tsv")
    radii = [0.0, 0.01, 0.5, 1.0, 2.0]
    summary = summarize("r", read_tsv(tmp_path / "r.tsv"), radii)
    for r in radii:
        assert summary.certified_accuracy[r] == cohen_approximate_accuracy(tmp_path / "r.tsv", r)


def test_summary_acr_and_abstain_rate(tmp_path):
    write_rows(tmp_path / "r.tsv")
    summary = summarize("r", read_tsv(tmp_path / "r.tsv"), [0.0, 0.5])
    # Radii as written ({:.3}): 0.912, 0.0123 and 1.7 are the correct ones; mean over all 5.
    assert summary.acr == pytest.approx((0.912 + 0.0123 + 1.7) / 5)
    assert summary.abstain_rate == pytest.approx(0.2)
    assert summary.certified_accuracy == {0.0: 0.6, 0.5: 0.4}
    table = markdown_table([summary, summarize("s", read_tsv(tmp_path / "r.tsv"), [0.0, 0.5])])
    assert table.splitlines()[0] == "| | r | s |"
    assert "| cert. acc. @ r = 0.5 | 40.0% | 40.0% |" in table
    assert "| ACR | 0.525 | 0.525 |" in table and "| abstain | 20.0% | 20.0% |" in table


def test_plot_writes_a_png(tmp_path):
    write_rows(tmp_path / "r.tsv")
    plot_certified_accuracy({"r": read_tsv(tmp_path / "r.tsv")}, tmp_path / "out" / "plot.png")
    assert (tmp_path / "out" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[:-7],  # cut inside the time field: no trailing newline
        lambda text: text[: text.rindex("\n", 0, -1) + 4],  # only "4\t9" of the last row
        lambda text: text[:-1].rsplit("\t", 2)[0] + "\n",  # wrong field count, with newline
    ],
)
def test_resume_redoes_a_half_written_last_line(tmp_path, damage):
    path = tmp_path / "r.tsv"
    write_rows(path)
    path.write_text(damage(path.read_text()))
    with TsvWriter(path, resume=True) as writer:
        assert [r.idx for r in writer.done] == [0, 1, 2, 3] and writer.dropped
        assert writer.last_idx == 3
        writer.write(*ROWS[4])
    write_rows(tmp_path / "clean.tsv")
    assert path.read_text() == (tmp_path / "clean.tsv").read_text()


def test_resume_of_an_empty_or_header_only_file(tmp_path):
    for content in ("", "idx\tlab", HEADER, HEADER + "\n"):
        path = tmp_path / "r.tsv"
        path.write_text(content)
        with TsvWriter(path, resume=True) as writer:
            assert writer.done == []
            writer.write(*ROWS[0])
        assert path.read_text() == HEADER + "\n" + cohen_certify_line(*ROWS[0]) + "\n"


def test_corrupt_tsv_is_a_clear_error_with_the_line_number(tmp_path):
    path = tmp_path / "r.tsv"
    write_rows(path)
    lines = path.read_text().split("\n")
    lines[2] = lines[2].replace("\t1\t", "\tx\t", 1)  # non-numeric field in the middle
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"r.tsv:3: non-numeric"):
        TsvWriter(path, resume=True)
    with pytest.raises(ValueError, match=r"r.tsv:3"):
        read_tsv(path)
    path.write_text("index\tlabel\n0\t1\n")
    with pytest.raises(ValueError, match=r"r.tsv:1: not a certification TSV"):
        TsvWriter(path, resume=True)
    path.write_text(HEADER + "\n" + cohen_certify_line(*ROWS[1]) + "\n")
    path.write_text(path.read_text() + cohen_certify_line(*ROWS[0]) + "\n")
    with pytest.raises(ValueError, match="does not increase"):
        read_tsv(path)


def test_existing_file_needs_resume_or_overwrite(tmp_path):
    write_rows(tmp_path / "r.tsv")
    with pytest.raises(FileExistsError, match="--resume"):
        TsvWriter(tmp_path / "r.tsv")


def test_merge_sorts_shards_and_rejects_overlap_and_foreign_headers(tmp_path):
    write_rows(tmp_path / "a.tsv", ROWS[1::2])
    write_rows(tmp_path / "b.tsv", ROWS[0::2])
    assert merge_tsv(tmp_path / "all.tsv", [tmp_path / "a.tsv", tmp_path / "b.tsv"]) == 5
    write_rows(tmp_path / "clean.tsv")
    assert (tmp_path / "all.tsv").read_text() == (tmp_path / "clean.tsv").read_text()
    with pytest.raises(ValueError, match="idx 0 appears in both"):
        merge_tsv(tmp_path / "x.tsv", [tmp_path / "b.tsv", tmp_path / "clean.tsv"])
    (tmp_path / "other.tsv").write_text("idx\tlabel\tpredict\tradius\tcorrect\n")
    with pytest.raises(ValueError, match="other.tsv:1"):
        merge_tsv(tmp_path / "x.tsv", [tmp_path / "a.tsv", tmp_path / "other.tsv"])
    with pytest.raises(ValueError, match="also an input"):
        merge_tsv(tmp_path / "a.tsv", [tmp_path / "a.tsv"])
