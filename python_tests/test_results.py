"""Cohen et al.'s TSV format: writing, resuming, merging and analysing (drs_ext/io/results.py)."""

from __future__ import annotations

import datetime
import warnings

import numpy as np
import pytest

from drs_ext.io.results import (
    HEADER,
    TsvWriter,
    UncheckedSettingsWarning,
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
    with pytest.warns(UncheckedSettingsWarning, match="cannot check that the inputs come from"):
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
    with pytest.raises(FileExistsError, match="all.tsv exists.*--overwrite"):
        merge_tsv(tmp_path / "all.tsv", [tmp_path / "a.tsv"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedSettingsWarning)
        assert merge_tsv(tmp_path / "all.tsv", [tmp_path / "a.tsv"], overwrite=True) == 2


def test_time_column_in_plain_seconds_is_read_as_seconds(tmp_path):
    """Cohen et al.'s stored CIFAR-10 results write the time as seconds ("16.9")."""
    path = tmp_path / "cohen.tsv"
    path.write_text(HEADER + "\n0\t3\t3\t0.912\t1\t16.9\n1\t7\t-1\t0.0\t0\t3\n")
    rows = read_tsv(path)
    assert [r.seconds for r in rows] == [16.9, 3.0] and rows[0].time == "16.9"
    write_rows(tmp_path / "ours.tsv")
    assert [r.seconds for r in read_tsv(tmp_path / "ours.tsv")] == [r[5] for r in ROWS]
    long = format_row(0, 1, 1, 0.5, 1, 90061.5).split("\t")[5]  # "1 day, 1:01:01.500000"
    path.write_text(HEADER + "\n" + format_row(0, 1, 1, 0.5, 1, 90061.5) + "\n")
    assert read_tsv(path)[0].seconds == 90061.5 and "day" in long


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("0\t1\t1\t0.5\t1\tsoon", r"r.tsv:2: invalid row .*: time must be H:MM:SS"),
        ("0\t1\t1\t0.5\tyes\t1.0", r"r.tsv:2: non-numeric field correct = 'yes'"),
        ("0\t1\t1\t0.5\t2\t1.0", r"r.tsv:2: invalid row .*: correct must be 0 or 1"),
        ("0\t1\t1\tnan\t1\t1.0", r"r.tsv:2: invalid row .*: radius must be >= 0"),
        ("-1\t1\t1\t0.5\t1\t1.0", r"r.tsv:2: invalid row .*: idx must be >= 0"),
    ],
)
def test_bad_fields_are_named(tmp_path, row, message):
    (tmp_path / "r.tsv").write_text(HEADER + "\n" + row + "\n")
    with pytest.raises(ValueError, match=message):
        read_tsv(tmp_path / "r.tsv")


def test_binary_or_non_utf8_files_are_errors_naming_the_file(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes((HEADER + "\n0\t1\t1\t0.5\t1\t0:00:01 caf\xe9\n").encode("latin-1"))
    for call in (read_tsv, lambda p: TsvWriter(p, resume=True)):
        with pytest.raises(ValueError, match=r"latin1.tsv: not a certification TSV: byte 61 "):
            call(path)
    (tmp_path / "model.tsv").write_bytes(b"\x80\x02\x8a\nPK\x03\x04\x00\xff")
    with pytest.raises(ValueError, match=r"model.tsv(:1)?: not a certification TSV"):
        read_tsv(tmp_path / "model.tsv")
    with pytest.raises(ValueError, match=r"model.tsv(:1)?: not a certification TSV"):
        TsvWriter(tmp_path / "model.tsv", resume=True)


def test_extra_columns_round_trip_resume_and_merge(tmp_path):
    """A method's extra float columns (σ-routing's σ, R_σ, R_c) after Cohen et al.'s six:
    written exactly (repr), read back by name-free position, resumed and merged."""
    extra = ("sigma", "radius_sigma")
    path = tmp_path / "a.tsv"
    with TsvWriter(path, extra_fields=extra) as writer:
        writer.write(*ROWS[0], extra=(0.1767766952966369, float("nan")))
        writer.write(*ROWS[2], extra=(0.5, 0.25))
        with pytest.raises(ValueError, match="1 extra values for the columns"):
            writer.write(*ROWS[3], extra=(0.5,))
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER + "\tsigma\tradius_sigma"
    assert lines[1] == cohen_certify_line(*ROWS[0]) + "\t0.1767766952966369\tnan"
    rows = read_tsv(path)
    assert rows[0].extra[0] == 0.1767766952966369 and rows[1].extra == (0.5, 0.25)
    assert summarize("a", rows, [0.0]).images == 2  # the analysis reads the six columns
    with pytest.raises(ValueError, match=r"extra columns are \['sigma', 'radius_sigma'\]"):
        TsvWriter(path, resume=True)
    with TsvWriter(path, resume=True, extra_fields=extra) as writer:
        assert writer.last_idx == 2
        writer.write(*ROWS[4], extra=(1.0, 2.0))
    with TsvWriter(tmp_path / "b.tsv", extra_fields=extra) as writer:
        writer.write(*ROWS[1], extra=(0.25, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedSettingsWarning)
        assert merge_tsv(tmp_path / "m.tsv", [path, tmp_path / "b.tsv"]) == 4
        assert (tmp_path / "m.tsv").read_text().splitlines()[0] == lines[0]
        write_rows(tmp_path / "plain.tsv", ROWS[3:4])
        with pytest.raises(ValueError, match="different extra columns"):
            merge_tsv(tmp_path / "x.tsv", [path, tmp_path / "plain.tsv"])


def test_radius_is_written_rounded_down_to_three_digits():
    """Cohen et al.'s file keeps 3 significant digits; rounding to nearest could store a radius
    above the certified one (0.18984 -> 0.19), so the file rounds down (0.189)."""
    from drs_ext.io.rows import radius_text

    rng = np.random.default_rng(0)
    for r in [0.18984365, 0.9995, 9.996, *(rng.random(2000) * 10.0 ** rng.integers(-3, 4, 2000))]:
        text = radius_text(float(r))
        assert float(text) <= r and float(text) >= r * (1 - 0.011), (r, text)
        assert len(text.replace(".", "").replace("-", "").lstrip("0").split("e")[0]) <= 3
    assert [radius_text(r) for r in (0.19, 1.0, 0.0, -1.0)] == ["0.19", "1.0", "0.0", "-1.0"]
