"""The sample-count argument, checked against parameter counts written out by hand."""

from __future__ import annotations

import math

import pytest
from torch import nn

from dgdlens.models.sample_count import (
    count_parameters,
    decoder_samples_needed,
    encoder_samples_needed,
    sample_counts,
)
from dgdlens.nn.conv import conv_decoder, conv_encoder
from dgdlens.nn.decoders import mlp_decoder, mlp_encoder


def _dense_params(sizes):
    """Weights + biases of a stack of fully connected layers, by the textbook formula."""
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def test_mlp_counts_match_hand_formula():
    n, m, hidden = 64, 5, (100, 50)
    enc, dec = mlp_encoder(n, m, hidden), mlp_decoder(m, n, hidden)
    w_e = _dense_params([n, 50, 100, m])
    w_d = _dense_params([m, 100, 50, n])
    res = sample_counts(enc, dec, n_features=n)
    assert res.n_latent == m  # read from the modules
    assert (res.encoder_params, res.decoder_params) == (w_e, w_d)
    assert res.encoder_samples == math.ceil(w_e / m)
    assert res.decoder_samples == math.ceil(w_d / (n - m))
    # the definition: the smallest N with enough equations
    N = res.decoder_samples
    assert N * n >= w_d + N * m and (N - 1) * n < w_d + (N - 1) * m
    N = res.encoder_samples
    assert N * m >= w_e and (N - 1) * m < w_e
    assert res.ratio == pytest.approx(res.encoder_samples / res.decoder_samples)


def test_paper_mnist_architecture():
    # Two 64-channel convs (kernel 4, stride 2) + FC to m=20, and the mirror (research note section 3)
    enc, dec = conv_encoder((1, 28, 28), 20), conv_decoder(20, (1, 28, 28))
    w_e = (1 * 64 * 16 + 64) + (64 * 64 * 16 + 64) + (64 * 7 * 7 * 20 + 20)
    w_d = (20 * 3136 + 3136) + (64 * 64 * 16 + 64) + (64 * 1 * 16 + 1)
    assert (w_e, w_d) == (129_428, 132_481)
    res = sample_counts(enc, dec, n_features=784, n_latent=20)
    assert res.encoder_params == w_e and res.decoder_params == w_d
    assert res.encoder_samples == 6472 and res.decoder_samples == 174
    assert res.ratio > 30  # the decoder is specified by far fewer samples


def test_frozen_parameters_and_sharing():
    lin = nn.Linear(10, 3)
    tied = nn.Sequential(lin, nn.ReLU(), lin.__class__(3, 3))
    tied[2].weight.requires_grad_(False)
    assert count_parameters(tied) == 33 + 3
    assert count_parameters(tied, trainable_only=False) == 33 + 12
    shared = nn.Sequential(lin, lin)
    assert count_parameters(shared) == 33


def test_single_module_and_errors():
    dec = mlp_decoder(4, 30, (8,))
    res = sample_counts(decoder=dec, n_features=30)
    assert res.encoder_params is None and res.ratio is None
    assert res.decoder_samples == decoder_samples_needed(_dense_params([4, 8, 30]), 30, 4)
    with pytest.raises(ValueError, match="must exceed"):
        decoder_samples_needed(100, 5, 5)
    with pytest.raises(ValueError, match="encoder, a decoder"):
        sample_counts(n_features=10)
    with pytest.raises(ValueError, match="latent dimension"):
        sample_counts(nn.Linear(3, 2), n_features=3)
    with pytest.raises(ValueError):
        encoder_samples_needed(10, 0)
