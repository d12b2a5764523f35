"""dgdlens.lens.peak_sets / nearest_gene_links against hand-computed truth, and the lens run on peak sets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from dgdlens.lens import GeneSets, annotate, nearest_gene_links, peak_sets
from dgdlens.lens.peaksets import parse_peak_names

SETS = {"A": ["g1", "g2", "g3"], "B": ["g3", "g4"], "C": ["g9"]}
# p1 -> g1; p2 -> g1 and g3 (two genes); p3 -> g3; p4 -> g4; p5 unlinked; g2 has no peak
LINKS = pd.DataFrame({"peak": ["p1", "p2", "p2", "p3", "p4", "p5"], "gene": ["g1", "g1", "g3", "g3", "g4", ""]})
TRUTH = {"A": ["p1", "p2", "p3"], "B": ["p2", "p3", "p4"]}  # C: g9 has no peak, so no set


def test_peak_sets_from_a_link_table():
    out = peak_sets(SETS, LINKS)
    assert isinstance(out, GeneSets)
    assert dict(out) == TRUTH
    assert out.description("A") == "A (peaks of 2 of its 3 genes)"
    assert out.description("B") == "B (peaks of 2 of its 2 genes)"


@pytest.mark.parametrize("form", ["series", "mapping", "columns", "var_column"])
def test_every_link_form_gives_the_same_sets(form):
    if form == "series":  # repeated index entries: several genes per peak
        links = pd.Series(LINKS["gene"].to_numpy(), index=LINKS["peak"].to_numpy())
    elif form == "mapping":
        links = {"p1": "g1", "p2": ["g1", "g3"], "p3": "g3", "p4": "g4", "p5": None}
    elif form == "columns":  # a simulation's uns["truth"]["peak_gene_links"]
        links = {"peak": LINKS["peak"].tolist(), "gene": LINKS["gene"].tolist()}
    else:  # one gene per peak, as var["linked_gene"] holds it ("" = unlinked): p2 keeps only g3 here
        links = pd.Series(["g1", "g3", "g3", "g4", ""], index=["p1", "p2", "p3", "p4", "p5"])
    truth = TRUTH if form != "var_column" else {"A": ["p1", "p2", "p3"], "B": ["p2", "p3", "p4"]}
    assert dict(peak_sets(SETS, links)) == truth


def test_measured_peaks_and_size_bounds():
    assert dict(peak_sets(SETS, LINKS, peaks=["p1", "p3", "p4"])) == {"A": ["p1", "p3"], "B": ["p3", "p4"]}
    assert dict(peak_sets(SETS, LINKS, peaks=["p1", "p3", "p4"], min_size=1, max_size=1)) == {}
    assert dict(peak_sets(SETS, LINKS, min_size=4)) == {}
    with pytest.raises(ValueError, match="min_size"):
        peak_sets(SETS, LINKS, min_size=0)
    with pytest.raises(ValueError, match="'peak' and 'gene'"):
        peak_sets(SETS, pd.DataFrame({"region": ["p1"], "gene": ["g1"]}))
    with pytest.raises(TypeError, match="peak_to_gene"):
        peak_sets(SETS, 3)


def test_provenance_of_a_named_collection_is_kept():
    source = GeneSets(SETS, descriptions={"A": "alpha"}, name="toy", title="Toy sets", release="1")
    out = peak_sets(source, LINKS)
    assert out.name == "toy peaks" and out.release == "1" and out.title == "Toy sets, as peaks linked to the genes"
    assert out.description("A") == "alpha (peaks of 2 of its 3 genes)"


def test_parse_peak_names():
    coords = parse_peak_names(["chr1:100-200", "chrX-5-9", "chr2_10_20"])
    assert coords.to_dict("list") == {"chrom": ["chr1", "chrX", "chr2"], "start": [100, 5, 10], "end": [200, 9, 20]}
    with pytest.raises(ValueError, match="not 'chrom:start-end'"):
        parse_peak_names(["chr1:200-100"])
    with pytest.raises(ValueError, match="not 'chrom:start-end'"):
        parse_peak_names(["peak7"])


def test_nearest_gene_links_by_hand():
    genes = pd.DataFrame({"gene": ["a", "b", "c", "d", "e"], "chrom": ["chr1", "chr1", "chr1", "chr2", "chr1"],
                          "tss": [1000, 5000, 5600, 300, 5000]})
    peaks = ["chr1:900-1100",    # a's TSS inside: 0
             "chr1:2000-2500",   # a 1000 before the start, b 2500 after the end -> a, 1000
             "chr1:4000-4400",   # b and e (same TSS) 600 after the end -> b (listed first), 600
             "chr1:5250-5350",   # b 250 before, c 250 after: a tie -> the smaller position, b, 250
             "chr1:7000-7100",   # c 1400 before -> c
             "chr2:10-20",       # d 280 after -> d
             "chr3:10-20"]       # no gene on chr3 -> no row
    out = nearest_gene_links(peaks, genes)
    assert out["peak"].tolist() == peaks[:-1]
    assert out["gene"].tolist() == ["a", "a", "b", "b", "c", "d"]
    assert out["distance"].tolist() == [0, 1000, 600, 250, 1400, 280]
    near = nearest_gene_links(peaks, genes, max_distance=500)
    assert near["peak"].tolist() == ["chr1:900-1100", "chr1:5250-5350", "chr2:10-20"]


def test_nearest_gene_links_from_gene_bodies_and_a_coordinate_table():
    # TSS = start on '+', end on '-': a at 1000, b at 5000
    genes = pd.DataFrame({"chrom": ["chr1", "chr1"], "start": [1000, 3000], "end": [2000, 5000],
                          "strand": ["+", "-"]}, index=["a", "b"])
    coords = pd.DataFrame({"chrom": ["chr1", "chr1"], "start": [2100, 4000], "end": [2200, 4100]}, index=["x", "y"])
    out = nearest_gene_links(coords, genes)
    assert out.to_dict("list") == {"peak": ["x", "y"], "gene": ["a", "b"], "distance": [1100, 900]}
    # and the links feed peak_sets directly
    assert dict(peak_sets({"S": ["b"]}, out)) == {"S": ["y"]}
    with pytest.raises(ValueError, match="'tss'"):
        nearest_gene_links(coords, genes.drop(columns="strand"))


def test_lens_annotates_a_feature_by_its_peak_set():
    """Peaks linked to programme P's genes open only where feature 0 is active: the lens must find P."""
    rng = np.random.default_rng(0)
    n_cells, n_peaks = 400, 120
    peaks = [f"chr1:{1000 * i}-{1000 * i + 500}" for i in range(n_peaks)]
    genes = [f"gene{i}" for i in range(60)]
    links = pd.DataFrame({"peak": peaks, "gene": [genes[i // 2] for i in range(n_peaks)]})  # 2 peaks per gene
    programs = {"P": genes[:10], "Q": genes[10:20], "R": genes[20:30]}
    sets = peak_sets(programs, links, peaks=peaks)
    assert all(len(v) == 20 for v in sets.values())
    active = np.zeros(n_cells, bool)
    active[:80] = True
    rate = np.full((n_cells, n_peaks), 0.3)
    rate[np.ix_(active, np.isin(peaks, sets["P"]))] = 3.0
    counts = sp.csr_matrix(rng.poisson(rate).astype(np.float32))
    activations = np.zeros((n_cells, 2), np.float32)
    activations[active, 0] = rng.uniform(1, 2, active.sum())
    activations[:, 1] = rng.uniform(0, 1, n_cells) * (rng.uniform(size=n_cells) < 0.3)
    table = annotate(activations, counts, peaks, sets, percentile=80, min_active_cells=20, use_aliases=False,
                     min_set_size=5, seed=0)
    best = table[(table["feature"] == 0) & (table["direction"] == "up")].sort_values("padj_global")
    assert best["term"].iloc[0] == "P"
    assert not ((table["feature"] == 1) & (table["term"] == "P") & table["significant"]).any()
