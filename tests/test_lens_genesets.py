"""Bundled gene-set collections, GMT input/output, identifier rescue and the enrichment universe."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

import dgdlens.lens as lens


def test_bundled_collections_load_with_provenance():
    table = lens.available_gene_sets()
    assert set(table["name"]) == {"go_bp", "go_mf", "go_cc", "hallmark", "reactome_wp_pid"}
    hallmark = lens.gene_sets("hallmark")
    assert len(hallmark) == 50 and "HALLMARK_HYPOXIA" in hallmark
    assert "v7.5.1" in hallmark.release and "CC BY 4.0" in hallmark.license
    go = lens.gene_sets("GO_BP", min_size=15, max_size=500)  # names are case/alias tolerant
    sizes = go.sizes()
    assert sizes.min() >= 15 and sizes.max() <= 500 and len(go) > 4000
    assert "2022-07-01" in go.release
    full = lens.gene_sets("go_bp")
    assert full.description("GO:0006915").lower().startswith("apoptotic process")
    # propagated annotations: a parent term (apoptotic process) holds all genes of its child (intrinsic ...)
    assert set(full["GO:0097193"]) < set(full["GO:0006915"])
    cp = lens.gene_sets("reactome_wp_pid")
    assert not any(t.startswith(("KEGG_", "BIOCARTA_")) for t in cp)


def test_unknown_collection_is_an_error_that_lists_the_choices():
    with pytest.raises(ValueError, match="go_bp"):
        lens.gene_sets("kegg")


def test_gmt_round_trip_plain_and_gzipped(tmp_path):
    sets = {"SET_A": ["A", "B", "C"], "SET_B": ["C", "D"]}
    for name in ("x.gmt", "x.gmt.gz"):
        path = tmp_path / name
        lens.write_gmt(sets, path)
        back = lens.read_gmt(path)
        assert dict(back) == sets
    assert gzip.decompress((tmp_path / "x.gmt.gz").read_bytes()).startswith(b"SET_A\tSET_A\tA\tB\tC")


def test_read_gmt_rejects_malformed_files(tmp_path):
    bad = tmp_path / "bad.gmt"
    bad.write_text("SET_A A B C\n")  # spaces instead of tabs
    with pytest.raises(ValueError, match="tab"):
        lens.read_gmt(bad)
    dup = tmp_path / "dup.gmt"
    dup.write_text("S\td\tA\nS\td\tB\n")
    with pytest.raises(ValueError, match="twice"):
        lens.read_gmt(dup)
    with pytest.raises(FileNotFoundError):
        lens.read_gmt(tmp_path / "missing.gmt")


def test_old_symbols_and_ensembl_ids_are_rescued():
    collection = lens.gene_sets("go_bp").genes()
    aliases = lens.gene_aliases()
    old, new = next((a, s) for a, s in aliases.items() if s in collection and a not in collection)
    ens, sym = next((e, s) for e, s in lens.ensembl_to_symbol().items() if s in collection and s != new)
    mapping = lens.map_gene_names([old, ens + ".7", "NOT_A_GENE", new], collection)
    # the current symbol matched directly wins, the alias standing for it becomes a duplicate
    assert mapping.how == ["duplicate", "ensembl", "unmapped", "direct"]
    assert mapping.symbols[1] == sym
    only_alias = lens.map_gene_names([old], collection)
    assert only_alias.symbols == [new] and only_alias.how == ["alias"]


def test_universe_is_tested_genes_in_the_collection_and_sizes_are_counted_inside_it():
    sets = {"S1": ["A", "B", "C", "D", "X1"], "S2": ["A", "E"], "S3": ["B", "C", "D", "E", "F", "G"]}
    genes = ["A", "B", "C", "D", "E", "F", "G", "OUTSIDE"]
    tested = np.array([1, 1, 1, 1, 1, 1, 0, 1], dtype=bool)  # G could not be selected
    index = lens.index_gene_sets(genes, sets, tested=tested, min_size=3, max_size=4, use_aliases=False)
    assert index.universe_size == 6  # A-F: OUTSIDE is in no set, G was not tested
    assert list(index.terms) == ["S1"]  # S2 too small; S3 has 5 universe genes, above max_size
    assert list(index.set_sizes) == [4]
    with pytest.raises(ValueError, match="None of the"):
        lens.index_gene_sets(["Q1", "Q2"], sets)
