"""Layers and models: every registered model trains a step, every preset builds with the advertised parameter
count, every computation mode gives the same logits, prefill + per-token decode equals the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gateloop_jax import layers, ops
from gateloop_jax.models import (MODELS, PRESETS, ModelConfig, build_model, expected_param_count, param_count,
                                 preset_config, resolve_config)

VOCAB = 64


def tiny(name, **overrides):
    return preset_config("test", name=name, vocab_size=VOCAB, **overrides)


def tokens(seed, b=2, t=13):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, VOCAB)


def loss_fn(model, inputs, targets):
    logits = model(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_optimisation_step_lowers_the_loss(name):
    model = build_model(tiny(name), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    batch = tokens(1, t=17)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets)
        optimizer.update(model, grads)
        return loss

    before = step(model, optimizer)
    after = loss_fn(model, inputs, targets)
    assert np.isfinite(before) and after < before, (name, float(before), float(after))


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("name", ["gateloop", "transformer", "hybrid"])
def test_every_preset_builds_with_the_formula_parameter_count(preset, name):
    config = resolve_config(preset_config(preset, name=name))
    if name != "gateloop" and config.head_dims[0] == 1:  # max-headed makes no sense for attention
        config = config.replace(num_heads=config.d_model // 64, d_qk=None, d_v=None)
    # Abstract build: shapes only, so the 350M preset costs no memory.
    model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    assert param_count(model) == expected_param_count(config)


def test_presets_have_the_advertised_sizes():
    count = lambda p, name="gateloop": expected_param_count(resolve_config(preset_config(p, name=name)))  # noqa: E731
    assert 120e6 <= count("125m") <= 135e6
    assert 330e6 <= count("350m") <= 370e6
    # A hybrid "ggga" stack: three GateLoop blocks (15 d^2 each) per attention block (12 d^2), between the two.
    assert count("125m_multihead", "transformer") < count("125m_multihead", "hybrid") < count("125m_multihead")


def test_hybrid_interleaves_blocks_by_the_pattern():
    model = nnx.eval_shape(lambda: build_model(tiny("hybrid", num_layers=6, block_pattern="gga"), rngs=nnx.Rngs(0)))
    kinds = ["a" if isinstance(block.mixer, layers.CausalSelfAttention) else "g" for block in model.blocks]
    assert "".join(kinds) == "ggagga" == model.config.layer_kinds
    assert resolve_config(tiny("hybrid", num_layers=5)).layer_kinds == "gagag"  # the test preset's "ga", tiled


@pytest.mark.parametrize("layout", [dict(num_heads=2), dict(num_heads=32, d_qk=1, d_v=1)],
                         ids=["multihead", "maxheaded"])
def test_every_mode_gives_the_same_logits(layout):
    model = build_model(tiny("gateloop", **layout), rngs=nnx.Rngs(0))
    batch = tokens(2, t=21)
    logits = {mode: model(batch, mode=mode) for mode in ops.MODES}
    scale = float(jnp.max(jnp.abs(logits["recurrent"])))
    for mode, value in logits.items():
        np.testing.assert_allclose(value, logits["recurrent"], rtol=0, atol=1e-5 * scale, err_msg=mode)


@pytest.mark.parametrize("name, overrides", [(name, {}) for name in sorted(MODELS)] + [
    ("gateloop", {"short_conv_size": 4}), ("gateloop", {"phase_coupling": "decay", "init_max_phase": 1.0})],
    ids=sorted(MODELS) + ["gateloop_short_conv", "gateloop_decay_coupled"])
def test_prefill_then_decode_equals_full_forward(name, overrides):
    """Batched prompts of different lengths (right padded), prefill in parallel, then one token at a time (with a
    short convolution, the cache carries each row's last inputs before its own length)."""
    model = build_model(tiny(name, **overrides), rngs=nnx.Rngs(0))
    b, t = 3, 16
    seq = tokens(3, b=b, t=t)
    full = model(seq)
    prompt_lengths = jnp.array([5, 9, 7])
    mask = jnp.arange(9)[None, :] < prompt_lengths[:, None]
    prompt = jnp.where(mask, seq[:, :9], 0)
    prefill_logits, cache = model.prefill(prompt, mask=mask, max_len=t)
    scale = float(jnp.max(jnp.abs(full)))
    # Prefill logits at real positions match the full forward.
    np.testing.assert_allclose(jnp.where(mask[..., None], prefill_logits, 0), jnp.where(mask[..., None],
                               full[:, :9], 0), atol=1e-5 * scale, rtol=0)
    # Then each row continues from its own length.
    step = nnx.jit(lambda model, tok, cache: model.decode_step(tok, cache))
    for i in range(5):
        positions = prompt_lengths + i
        token = seq[jnp.arange(b), positions]
        logits, cache = step(model, token, cache)
        expected = full[jnp.arange(b), positions]
        np.testing.assert_allclose(logits, expected, atol=1e-5 * scale, rtol=0, err_msg=f"decode step {i}")


def test_transition_variants():
    batch = tokens(4)
    for transition in ("data_controlled", "fixed", "real", "none"):
        model = build_model(tiny("gateloop", transition=transition), rngs=nnx.Rngs(0))
        (log_r, phase), *_ = model.transitions(batch)
        assert log_r.shape == (2, 13, 2, 16) and bool(jnp.all(log_r <= 0))
        if transition == "none":
            assert bool(jnp.all(log_r == 0)) and bool(jnp.all(phase == 0))
        if transition == "real":
            assert bool(jnp.all(phase == 0)) and bool(jnp.any(log_r < 0))
        if transition == "fixed":  # input independent: the same at every position and in every row
            assert bool(jnp.all(log_r == log_r[:1, :1])) and bool(jnp.all(phase == phase[:1, :1]))
        if transition == "data_controlled":
            assert float(jnp.std(log_r[:, :, 0, 0])) > 0


@pytest.mark.parametrize("activation", ["sigmoid", "sigmoid_tempered", "lru_exp"])
@pytest.mark.parametrize("init", ["slow_forget", "lru_ring"])
def test_initial_magnitudes_follow_the_init_strategy(activation, init):
    config = tiny("gateloop", magnitude_activation=activation, init=init, d_model=64, num_heads=4)
    model = build_model(config, rngs=nnx.Rngs(0))
    (log_r, phase), *_ = model.transitions(tokens(5))
    magnitude = jnp.exp(log_r)
    # The data-dependent weights start at 1% variance, so the biases' range holds up to a small spread.
    assert float(jnp.min(magnitude)) >= 0.85 and float(jnp.max(magnitude)) <= 0.9999
    if init == "slow_forget":  # phases start small: biases in [0, 0.1] plus the small data-dependent part
        assert float(jnp.mean(jnp.abs(phase))) <= 0.15


def test_inverse_parametrisations_round_trip():
    log_r = jnp.log(jnp.array([0.1, 0.5, 0.9, 0.999]))
    for activation in ("sigmoid", "sigmoid_tempered", "lru_exp"):
        gamma = layers.inverse_log_magnitude(log_r, activation, 16.0)
        np.testing.assert_allclose(layers.log_magnitude(gamma, activation, 16.0), log_r, rtol=1e-4)
    phi = jnp.array([-2.0, 0.0, 0.3, 3.0])
    np.testing.assert_allclose(layers.phase(layers.inverse_phase(phi, "tanh_pi"), "tanh_pi"), phi, rtol=1e-4)


def test_sigmoid_log_magnitude_is_exact_for_extreme_gates():
    """log sigmoid(gamma) in log space: sigmoid(-200) underflows to 0 in float32, its log must not be -inf."""
    log_r = layers.log_magnitude(jnp.array([-200.0, 0.0, 30.0]), "sigmoid", 1.0)
    np.testing.assert_allclose(log_r, [-200.0, np.log(0.5), -np.exp(-30.0)], rtol=1e-6)


@pytest.mark.parametrize("field, value, pattern", [
    ("mode", "fast", r"mode='fast' is not one of"),
    ("transition", "learned", r"transition='learned' is not one of"),
    ("output_norm", "groupnorm", r"output_norm='groupnorm' normalises each head over d_v, which is 1"),
    ("num_heads", 3, r"d_model=32 is not divisible by num_heads=3"),
    ("init_max_magnitude", 1.0, r"init_min_magnitude <= init_max_magnitude < 1"),
    ("block_pattern", "gxa", r"block_pattern='gxa' must be a non-empty string over 'g' \(GateLoop block\) and 'a'"),
    ("block_pattern", "ggga", r"block_pattern='ggga' tiled to num_layers=2 is 'gg', a stack of one kind"),
])
def test_bad_model_config_names_the_field(field, value, pattern):
    overrides = {field: value}
    if field == "output_norm":
        overrides.update(num_heads=32, d_qk=1, d_v=1)
    with pytest.raises(ValueError, match=pattern):
        tiny("hybrid" if field == "block_pattern" else "gateloop", **overrides)


def test_unknown_field_and_name_are_errors():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['heads'\]"):
        ModelConfig.from_mapping({"heads": 4})
    with pytest.raises(ValueError, match=r"name='mamba' is not registered"):
        build_model(ModelConfig(name="mamba"), rngs=nnx.Rngs(0))


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = build_model(tiny("gateloop", dtype="bfloat16"), rngs=nnx.Rngs(0))
    logits = model(tokens(6))
    assert logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    reference = build_model(tiny("gateloop"), rngs=nnx.Rngs(0))(tokens(6))
    assert float(jnp.max(jnp.abs(logits - reference))) <= 0.1 * float(jnp.max(jnp.abs(reference)))


def test_remat_matches_plain_forward_and_gradients():
    """remat=True recomputes each block in the backward pass: same loss and gradients, inside jit + grad (as in the
    train step, where the model is merged inside the traced function)."""
    import optax

    def loss_and_grads(remat):
        config = preset_config("test", name="gateloop").replace(remat=remat)
        graphdef, params, rest = nnx.split(build_model(config, rngs=nnx.Rngs(0)), nnx.Param, ...)

        def loss_fn(params, tokens):
            logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 13), 0, config.vocab_size)
        return jax.jit(jax.value_and_grad(loss_fn))(params, tokens)

    (loss, grads), (loss_r, grads_r) = loss_and_grads(False), loss_and_grads(True)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-7)


def test_remat_with_dropout_is_rejected():
    with pytest.raises(ValueError, match=r"remat=True with dropout_rate=0.1 is not supported"):
        preset_config("test", name="gateloop").replace(remat=True, dropout_rate=0.1)


def test_short_convolution_matches_a_loop():
    """layers.causal_depthwise_conv == the float64 sum over taps that stay inside the row and the segment; 1e-6:
    a float32 sum of <= 4 products of O(1) numbers."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal((2, 9, 2, 3))
    kernel = rng.standard_normal((4, 2, 3))
    segment_ids = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5] * 9])
    expected = np.zeros_like(x)
    for b in range(2):
        for n in range(9):
            for j in range(4):
                m = n - j
                if m >= 0 and np.all(segment_ids[b, m:n + 1] == segment_ids[b, n]):
                    expected[b, n] += kernel[j] * x[b, m]
    got = layers.causal_depthwise_conv(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32),
                                       jnp.asarray(segment_ids))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.max(np.abs(expected)))
    # Without segment_ids the taps cross the boundaries: the same row differs there.
    plain = layers.causal_depthwise_conv(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32))
    assert np.max(np.abs(np.asarray(plain)[0, 3] - expected[0, 3])) > 1e-3


def test_short_convolution_makes_the_mixer_see_the_previous_token():
    """With short_conv_size=2 a token's keys depend on the previous token: changing token 3 changes k at position 4
    (and nothing before 3); without the convolution k at 4 depends on token 4 alone."""
    for size, reaches in ((2, True), (0, False)):
        config = tiny("gateloop", short_conv_size=size)
        x = jax.random.normal(jax.random.key(0), (1, 8, config.d_model))
        x2 = x.at[0, 3].add(1.0)
        mixer = layers.GateLoopMixer(config, rngs=nnx.Rngs(0))
        k1, k2 = (mixer._inputs(z, None, mixer._short_conv(mixer._projections(z)))[1] for z in (x, x2))
        delta = np.max(np.abs(np.asarray(k1 - k2)), axis=(0, 2, 3))
        assert (delta[4] > 1e-4) == reaches and np.all(delta[:3] == 0) and np.all(delta[5:] == 0), (size, delta)


def test_phase_fraction_leaves_the_other_channels_real():
    """phase_fraction=0.5 (d_qk = 16): the first 8 channels of every head keep their data-controlled phase, the last
    8 are exactly real (arg a = 0), for the data-controlled and the fixed transition; 1.0 phases every channel."""
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    for transition in ("data_controlled", "fixed"):
        for fraction, phased in ((0.5, 8), (1.0, 16)):
            config = tiny("gateloop", transition=transition, phase_fraction=fraction, init_max_phase=1.0)
            assert config.head_dims[0] == 16 and config.phased_channels == phased
            phi = np.asarray(layers.GateLoopMixer(config, rngs=nnx.Rngs(0)).transition(x).phase)
            assert np.all(phi[..., phased:] == 0.0), (transition, fraction)
            assert np.all(np.abs(phi[..., :phased]) > 0.0), (transition, fraction)


def test_decay_coupled_phase_turns_in_proportion_to_forgetting():
    """phase_coupling="decay": arg a = g(theta) * (-log|a|) channel by channel, with the same parameters as "free"
    (so the same theta), for the data-controlled and the fixed transition; a token that keeps the state (|a| = 1 at
    its padded positions, which the mask makes identity steps) turns it by nothing."""
    x = jax.random.normal(jax.random.key(3), (2, 6, 32))
    for transition in ("data_controlled", "fixed"):
        free, coupled = (layers.GateLoopMixer(tiny("gateloop", transition=transition, init_max_phase=1.0,
                                                   phase_coupling=c), rngs=nnx.Rngs(0)).transition(x)
                         for c in ("free", "decay"))
        np.testing.assert_array_equal(np.asarray(coupled.log_magnitude), np.asarray(free.log_magnitude))
        expected = np.asarray(free.phase) * -np.asarray(free.log_magnitude)
        np.testing.assert_allclose(np.asarray(coupled.phase), expected, rtol=1e-6, atol=0)
        assert np.all(np.abs(expected) < np.abs(np.asarray(free.phase))), transition  # |a| < 1 shrinks every angle
    with pytest.raises(ValueError, match="phase_coupling"):
        tiny("gateloop", phase_coupling="tied").validate()


def test_rope_fraction_rotates_only_the_first_channels():
    """rope_fraction=0.5 (d_qk = 16): RoPE turns the first 8 channels of q and k with the frequencies of an 8-channel
    head, the last 8 pass through unrotated, so a query matches a key there whatever their distance; 1.0 rotates all."""
    x = jax.random.normal(jax.random.key(2), (2, 9, 4, 16))
    positions = jnp.broadcast_to(jnp.arange(9) + 5, (2, 9))
    for fraction, rotated in ((0.5, 8), (1.0, 16), (0.0, 0)):
        config = tiny("transformer", rope_fraction=fraction)
        assert config.head_dims[0] == 16 and config.rotary_channels == rotated
        y = np.asarray(layers.rope(x, positions, config.rope_base, config.rotary_channels))
        np.testing.assert_array_equal(y[..., rotated:], np.asarray(x[..., rotated:]))
        if rotated:
            # Exact: the same float32 arithmetic on the same first channels.
            np.testing.assert_array_equal(y[..., :rotated],
                                          np.asarray(layers.rope(x[..., :rotated], positions, config.rope_base)))
            assert np.max(np.abs(y[..., :rotated] - np.asarray(x[..., :rotated]))) > 0.1
    with pytest.raises(ValueError, match="rope_fraction"):
        tiny("transformer", rope_fraction=1.5).validate()


def _match_over_distance(config, variant, rng, length=256):
    """How strongly a query equal to the key k bound at position 0 matches it at each distance 1..length-1, summed
    over the channels that configs/mqar.py leaves distance-free (unphased / unrotated) and over all channels.

    GateLoop: the state after k is written at position 0 and turned by gates that keep it, whose phases come from the
    layer's own transition (theta projection drawn with unit-scale weights, as a learned phase is), read by q = k
    through ops.gateloop. Transformer: q . k after RoPE at positions n and 0, as attention scores them."""
    d = config.head_dims[0]
    k = rng.standard_normal(d).astype(np.float32)
    if variant == "gateloop":
        keep = d - config.phased_channels
        mixer = layers.GateLoopMixer(config, rngs=nnx.Rngs(0))
        mixer.theta_proj.kernel[...] = jnp.asarray(rng.standard_normal(mixer.theta_proj.kernel.shape), jnp.float32)
        # Every token keeps the state (|a| = sigmoid(20), 1 - 2e-9), as the filler tokens between a binding and its
        # query must for recall; the recurrence below runs at |a| = 1 exactly, so only the phase acts.
        mixer.gamma_proj.kernel[...] = jnp.zeros_like(mixer.gamma_proj.kernel[...])
        mixer.gamma_proj.bias[...] = jnp.full_like(mixer.gamma_proj.bias[...], 20.0)
        x = jnp.asarray(rng.standard_normal((1, length, config.d_model)), jnp.float32)
        phase = mixer.transition(x).phase[:, :, :1]  # (1, t, 1 head, d)
        keys = jnp.zeros((1, length, 1, d)).at[0, 0, 0].set(k)
        transition = ops.PolarTransition(jnp.zeros_like(phase), phase)

        def read(q):
            queries = jnp.broadcast_to(jnp.asarray(q), (1, length, 1, d))
            y = ops.gateloop(queries, keys, jnp.ones((1, length, 1, 1)), transition, mode="recurrent")
            return np.asarray(y[0, 1:, 0, 0])
    else:
        keep = d - config.rotary_channels
        positions = jnp.arange(length)[None]
        rotated = layers.rope(jnp.broadcast_to(jnp.asarray(k), (1, length, 1, d)), positions, config.rope_base,
                              config.rotary_channels)[0, :, 0]

        def read(q):
            return np.asarray(layers.rope(jnp.asarray(q)[None, None, None], jnp.zeros((1, 1), jnp.int32),
                                          config.rope_base, config.rotary_channels)[0, 0, 0] @ rotated[1:].T)
    free = np.where(np.arange(d) >= d - keep, k, 0.0)
    return read(free), read(k), float(np.sum(free * free)), float(np.sum(k * k))


@pytest.mark.parametrize("variant", ["gateloop", "transformer"])
def test_mqar_config_matches_a_key_to_its_query_at_every_distance(variant):
    """configs/mqar.py at full size (4 heads of 32): a query equal to a key scores |k|^2 at every distance up to
    L = 256 over the channels that recall uses. GateLoop phases every channel with the phase coupled to the decay,
    so tokens that keep the state (as the fillers between a binding and its query must) leave it unturned and the
    whole head matches; with the paper's free phase (H100: 0.89-0.97 at 11k steps with half the channels real; at
    chance with every channel phased) the same tokens turn it and the score swings with the distance. The Transformer
    leaves half of each head unrotated; with RoPE on every channel (1/K on the GPU) the score swings the same way
    (experiments/README.md, MQAR). The score is a float32 sum of 32 products: 1e-5 relative."""
    from train_test import get_config

    from gateloop_jax.train.trainer import model_config_from

    config = model_config_from(get_config("mqar", f"variant={variant}"))
    assert config.head_dims == (32, 32)
    if variant == "gateloop":
        # The phase path sends no gradient into the mixer's input (0.9985 / 0.964 at full size on an H100 with the
        # free phase, 0.83 with 1.0).
        assert config.phase_input_grad == 0.0 and config.phase_coupling == "decay" and config.phased_channels == 32
        _, score, _, norm = _match_over_distance(config, variant, np.random.default_rng(0))
        np.testing.assert_allclose(score, norm, rtol=1e-5)
        every = config.replace(phase_coupling="free")
    else:
        assert config.rotary_channels == 16
        free_score, _, free_norm, _ = _match_over_distance(config, variant, np.random.default_rng(0))
        np.testing.assert_allclose(free_score, free_norm, rtol=1e-5)
        every = config.replace(rope_fraction=1.0)
        assert every.rotary_channels == 32
    _, score, _, norm = _match_over_distance(every, variant, np.random.default_rng(0))
    # With every channel turned no channel keeps the match: somewhere in 1..255 the score falls below half of |k|^2.
    assert score.min() < 0.5 * norm, (variant, score.min(), norm)


def test_phase_input_grad_scales_only_the_phase_paths_gradient_into_the_input():
    """phase_input_grad = s leaves the forward pass bit-identical and scales the part of d(output)/d(input) that flows
    through the phase projection: g(s) = g(0) + s (g(1) - g(0)), with g(1) - g(0) a real share of the gradient (the
    phases are spread, 1 rad a token); the phase projection's own gradient is the same for every s."""
    x = jax.random.normal(jax.random.key(3), (2, 24, 32))
    grads, outputs = {}, {}
    for s in (0.0, 0.5, 1.0):
        mixer = layers.GateLoopMixer(tiny("gateloop", phase_input_grad=s, init_max_phase=1.0), rngs=nnx.Rngs(0))
        mixer.theta_proj.kernel[...] = 30.0 * mixer.theta_proj.kernel[...]
        graph, params = nnx.split(mixer, nnx.Param)
        loss = lambda p, x: jnp.sum(jnp.sin(nnx.merge(graph, p)(x)))  # noqa: E731
        outputs[s] = np.asarray(nnx.merge(graph, params)(x))
        grads[s] = jax.grad(loss, argnums=(0, 1))(params, x)
    np.testing.assert_array_equal(outputs[0.0], outputs[1.0])
    np.testing.assert_array_equal(outputs[0.5], outputs[1.0])
    g0, g_half, g1 = (np.asarray(grads[s][1]) for s in (0.0, 0.5, 1.0))
    assert np.linalg.norm(g1 - g0) > 0.1 * np.linalg.norm(g1)
    # Sums of float32 products of the same operands: 1e-5 of the gradient's scale.
    np.testing.assert_allclose(g_half, 0.5 * (g0 + g1), rtol=0, atol=1e-5 * np.max(np.abs(g1)))
    kernels = [np.asarray(grads[s][0]["theta_proj"]["kernel"][...]) for s in (0.0, 1.0)]
    np.testing.assert_allclose(kernels[0], kernels[1], rtol=0, atol=1e-6 * np.max(np.abs(kernels[1])))
    with pytest.raises(ValueError, match="phase_input_grad"):
        tiny("gateloop", phase_input_grad=-0.5).validate()
