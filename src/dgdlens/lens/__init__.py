"""The feature lens: gene-set annotation of SAE features, fast enough for every feature.

>>> import dgdlens as dl
>>> F = sae.encode(Z)                                   # cells x features, sparse
>>> res = dl.lens.annotate(F, adata.X, gene_names=adata.var_names, gene_sets="go_bp")
>>> dl.tl.annotate_features(adata, use_rep="X_sae")   # the AnnData verb: adata.uns["dgdlens_lens"]
>>> dl.lens.gene_sets("hallmark"), dl.lens.read_gmt("my.gmt"), dl.lens.enrich(genes, universe)
>>> dl.lens.classify_features(F, adata.obs["cell_type"])   # local / global features
>>> dl.lens.annotate(F, atac.X, atac.var_names, dl.lens.peak_sets(programs, links), use_aliases=False)  # peaks

Bundled collections (offline, human symbols): ``go_bp``, ``go_mf``, ``go_cc`` (GO 2022-07-01, propagated),
``hallmark`` and ``reactome_wp_pid`` (MSigDB v7.5.1); see :func:`available_gene_sets` for attribution.
"""

from .annotate import annotate
from .classify import classify_features
from .collapse import collapse_terms, mark_redundant
from .de_table import differential_expression
from .enrichment import GeneSetIndex, enrich, hypergeom_pvalues, index_gene_sets
from .expression import prepare_expression
from .genesets import (
    GeneSets,
    available_gene_sets,
    ensembl_to_symbol,
    gene_aliases,
    gene_sets,
    map_gene_names,
    read_gmt,
    write_gmt,
)
from .groups import make_feature_groups
from .peaksets import nearest_gene_links, peak_sets
from .simulate import PlantedData, planted_data, write_planted_h5ad
from .splitting import split_counts
from .streaming import StreamedExpression

__all__ = [
    "annotate", "classify_features", "differential_expression", "enrich",
    "hypergeom_pvalues", "index_gene_sets", "GeneSetIndex", "prepare_expression", "make_feature_groups",
    "GeneSets", "gene_sets", "available_gene_sets", "read_gmt", "write_gmt", "gene_aliases",
    "ensembl_to_symbol", "map_gene_names", "planted_data", "PlantedData", "collapse_terms", "mark_redundant",
    "split_counts", "write_planted_h5ad", "StreamedExpression",
    "peak_sets", "nearest_gene_links",
]
