"""The fixed prose of docs/VERIFICATION.md: what is checked, the rules, their proofs.

``ivp.verify.docs`` puts the measured figures around these sections; nothing here
depends on a run.
"""

from __future__ import annotations

INTRO = """\
## The question, and the short answer

A recomputer audits a random sample of a server's answers by re-running the
whitelisted model on the same input, with the same random seed, and checking that
the server's output is what that model would have produced. An honest server does not
compute exactly what the recomputer computes: it batches requests, pads prompts, uses
other thread counts and attention kernels, and each of these changes the last digits
of the model's scores ("logits"). Demanding bit-exact agreement would raise false
alarms against honest servers; ignoring the differences would let a cheat through and
leave a covert channel open.

ivp measures how far honest scores move **relative to each other** (**δ**, the model's
noise bound, signed into the whitelist: a shift of a whole row of scores changes no
sampled token, so it is not counted) and accepts a token only if some scores that
close to the recomputer's would have produced it under the request's seed. The
tolerance a verdict applies shrinks with the temperature, τ(T) = min(δ, T·ln(1+ε)/2),
so that what a server can hide without ever failing stays below 0.01% of the text's
own randomness at **every** temperature; this is proved below, and so is the rule's
soundness: an honest server whose noise stays within the tolerance never fails. What
the shrinking tolerance costs in false alarms is computed from the measured honest
noise and stated per temperature, and every figure is per model with its interval.
"""

METHOD = """\
## How a message is judged

**Replay.** The recomputer runs the whitelisted model once over prompt + claimed output
(one "prefill" pass) and gets the reference logits z_t at every output position t.

**The sampler is a function of the seed.** Sampler spec v1 turns logits and the
gateway's seed into a token: Gumbel noise g_t from Philox4x32-10 keyed by the seed,
score s_i = z_i/T + g_i, token = the best-scoring token of the allowed set A(z) (top-k,
then top-p). At T = 0 the token is the highest logit.

**δ\\* per position.** For the claimed token at position t, δ\\*_t is the smallest noise
bound under which some honest server could have emitted it. Without top-k/top-p,
δ\\*_t = T·(s_best − s_token)/2 (T = 0: (z_best − z_token)/2). With top-k/top-p the honest
server samples from A(z') of its own logits, so ivp brackets A(z') for every z' within
the bound (tokens surely and possibly allowed) and measures the claimed token against
the surely-allowed ones (`ivp.verify.bounds`).

**Verdict.** A message passes when every position has δ\\*_t ≤ τ(T) and it is well
formed (EOS last and only last, the finish reason the tokens give, no more than
max_tokens, text = decoding of the ids), with

    τ(T) = min(δ, (T/2)·ln(1 + 0.999·ε_n))   (T > 0),     τ(0) = min(δ, ln(1 + 0.999·ε_n)/2),
    ε_n = W(γ n)/n   (the solution of ε·e^{ε n} = γ; W = Lambert's function),

γ = 10⁻⁴ the channel goal and n the request's max_tokens (`ivp.verify.tolerance`;
`Policy("tolerant", δ, channel_goal=γ)`, what the recomputer applies). The flat rule
τ = δ is reported beside it for comparison. The figures kept are raw — δ\\*_t per
position — so both rules are judged on one scoring pass.

**Per-message statistic.** max_t δ\\*_t (+∞ at a structural problem) for every AUC and
detection curve; "within n tokens" and "AUC at n" apply it to the first n tokens. The
AUC compares attack messages with every honest message of the same run.
"""

SOUNDNESS = """\
## The noise that matters, and why the rule never fails an honest server

Let z be the recomputer's logits row at a position, z' the honest server's, e = z' − z,
and define the **half-span** ω = (max_i e_i − min_i e_i)/2 = min_c max_i |e_i − c|, and
for unrestricted sampling at temperature T the **decisive half-span** ω_T, the same
over R_T = {i : z_i ≥ max z − W_T} ∪ {i : z'_i ≥ max z' − W_T}, W_T = T·(G_MAX − G_MIN)
(≈ 26 T; T = 0: R_0 = {argmax z, argmax z'}).

**Theorem 1.** (a) For any sampler parameters, if ω ≤ τ the honest token has δ\\*_t ≤ τ.
(b) For unrestricted sampling (and T = 0), ω_T ≤ τ suffices. So an honest server whose
half-span (decisive half-span) stays within the tolerance never fails.

*Proof.* (a) Every step of sampler spec v1 is unchanged when a constant c is added to
every logit: top-k ranks by z, top-p by softmax(z/T), which is shift-invariant, and the
scores z_i/T + g_i all move by c/T. So the server's token under z' is its token under
z'' = z' − c with c = (max e + min e)/2, and |z'' − z|_∞ = ω ≤ τ. The rule is sound for
every such z'' (`ivp.verify.bounds`: A_in(τ) ⊆ A(z'') ⊆ A_out(τ), and s_i − s_tok ≤ 2τ/T
for every surely-allowed i because the honest token maximises s'' over A(z'') and each
score moves by at most τ/T). (b) Let tok = argmax_i s'_i with s' = z'/T + g, and
a = argmax_i s_i. As s'_tok ≥ s'_j for j = argmax z', z'_j − z'_tok ≤ T(g_tok − g_j) ≤
W_T, so tok ∈ R_T; likewise a ∈ R_T. Because s'_a ≤ s'_tok,
T(s_a − s_tok)/2 ≤ T[(s_a − s_tok) − (s'_a − s'_tok)]/2 = (e_tok − e_a)/2 ≤ ω_T, and δ\\*_t
is that quantity less a rounding allowance. T = 0 is the same with g = 0. ∎

So δ bounds ω, not max |e|: the issue's held-out servers moved logits by up to 2.1×
the old δ, almost all of it a common shift of the row (the per-source tables below give
both measures). The calibration takes ω per position over every source, and
δ = max(4 × the largest ω seen, a Gumbel-tail extrapolation to 10¹² positions).
"""

CHANNEL = """\
## The covert channel at every temperature

A server that must never fail an audit can still choose, at each position, among the
tokens the verdict accepts. The bits it can hide are measured against the **sampling
channel**: the entropy H(Y) of the honest output, what a server could hide if nobody
checked (by the chain rule H(Y) = E Σ_t H_t, H_t the entropy of the position's
sampling distribution).

**Theorem 2 (T > 0, no top-k/top-p).** Fix the prompt, T, max_tokens n and a tolerance
τ, and let ε = e^{2τ/T} − 1. Whatever the encoder — even one that knows the
recomputer's logits exactly — the expected number of bits (over the gateway's seed) a
message can carry without failing is at most ε·e^{εn}·H(Y). With τ = τ(T) of the rule,
ε ≤ ε_n and the bound is γ·H(Y): **at most 0.01% of the sampling channel**.

*Proof.* What an encoder can signal is log₂ N, N the number of distinct outputs the
verdict accepts for this prompt and seed. They form a tree: N(v) = Σ_{i ∈ C(v)} N(v·i)
over the accepted tokens C(v) after prefix v, N = 1 at a leaf (EOS or n tokens).
Unrestricted, i ∈ C(v) iff s_max − s_i ≤ 2τ/T (plus a rounding allowance the rule's
0.1% headroom covers). Write Gumbel-max as an exponential race, s_i = ln p_i − ln E_i with
E_i iid Exp(1) and p = softmax(z/T): the chosen token is i with probability p_i, and
P(i ∈ C(v), i not chosen) = p_i(1 − p_i)ε/(1 + p_iε) ≤ ε p_i(1 − p_i). The noise of a
position comes from Philox counters no other position uses, so C(v) is independent of
every subtree's noise and E N(v) = Σ_i p_i(1 + r_i)·E N(v·i), r_i ≤ ε(1 − p_i).
Unrolled, E N = E_honest[Π_t (1 + r_t(Y_t))], the expectation over the honest output Y.
With X = Σ_t (1 − p_t(Y_t)) ∈ [0, n]: Π_t(1 + r_t) ≤ e^{εX} ≤ 1 + εX·e^{εn}, and
E X = E Σ_t (1 − Σ_i p_{t,i}²) ≤ ln 2·H(Y), since 1 − Σp² ≤ 1 − 2^{−H} ≤ H ln 2. By Jensen,
E log₂ N ≤ log₂ E N ≤ log₂(1 + ε e^{εn} ln 2·H(Y)) ≤ ε e^{εn} H(Y). ∎

The measured column "channel" is the tighter log₂ E N itself, estimated by the mean of
Π_t(1 + r_t) over the honest messages at that temperature (from the server's own rows,
which differ from the replay's by the honest noise), with a 95% bootstrap interval.

**T = 0.** There is no seed and no sampling entropy: the bits are counted absolutely,
against a goal of 10⁻⁴ bits per token. A message carries at most
B = max over accepted outputs of Σ_t log₂|C_t| bits (the uniform choice among accepted
tokens gives every accepted output probability ≥ 2^{−B}, so N ≤ 2^B). Along honest
greedy messages |C_t| > 1 only at near ties, where another token's logit is within
2τ(0) of the top one; their rate is the bits per token. No bound holds for every prompt
(a prompt can force exact ties), so this one is measured: the count at 2τ(0), and the
rate of gaps below 0.01 scaled to 2τ(0) (assuming the gap density is flat near 0),
each with its exact 95% interval.

**The cost.** With τ(T) below δ, an honest server fails where its noise on the decisive
tokens exceeds τ(T) at a near tie. From the calibration's per-position records (the
server row's top 64 tokens, their noise and the row's normalisers), the expected
false-alarm probability of a position over the seed is computed exactly for every
temperature: the server's winner j fails iff some i scores within
κ_ij = (e_j − e_i − 2τ)/T below it under the server's logits, which the exponential race
gives as p'_j p'_i(e^κ − 1)/(1 + p'_i(e^κ − 1)); pairs with a token outside the recorded
64 add at most 2·m_tail·(e^{2(ω − τ)/T} − 1). The sum is an upper bound (a union over i).
Below some temperature the tolerance the goal needs is smaller than honest noise on
the top tokens, and no rule meets the goal there at zero false alarms: the tables say
where that is.
"""

LIMITS = """\
## What this does and does not prove

It shows, on these models and this machine, that an honest server that batches, pads,
threads and attends differently from the recomputer is not flagged, with the measured
rates and their intervals; that every cheating behaviour built here is flagged in the
messages where it changed a token, after the stated number of tokens; and it bounds,
with a proof at T > 0, what a server that never fails can smuggle out in its choice of
tokens.

It does not show:
- that δ covers hardware not measured. A GPU server (other kernels, TF32, bf16) needs its
  own calibration; its δ goes into a new whitelist version signed under quorum.
- that every possible cheat is caught. A substitute that agrees with the whitelisted
  model on every audited token to within the tolerance is indistinguishable from it by
  construction. A cheat that changed no token of a message leaves nothing to detect in
  it; the attack tables count those separately.
- a bound for top-k/top-p sampling's channel (Theorem 2 is for unrestricted sampling;
  near the top-k/top-p cut the bracket accepts a few more tokens) or for every prompt
  at T = 0 (measured, not proved).
- anything about channels other than the token choices: timing, which requests a server
  answers, or hardware side channels are bounded by the gateway (fixed-grid release,
  re-serialisation) and by physical inspection, not by this check.
- that the tiny random model's figures transfer: it is a test fixture. The Gemma-3-270M
  section is the headline.
"""

PEERS = """\
## Against the published peers, and how the settings differ

- **False alarms.** Rinberg et al. state 1e-4 per message; TOPLOC reports 0 false
  positives over 2,000 queries. The bounds here are one-sided 95% Clopper–Pearson bounds
  per model, over honest messages served under every source of the table and audited
  in recomputer batches of 1–8. They cover CPU nondeterminism only.
- **int4 detection.** Token-DiFR needs ~300 output tokens for AUC > 0.999 against a 4-bit
  model, comparing bf16 GPU providers with unknown kernels, so its honest noise is
  bf16-sized. Here the reference and the honest server are both fp32 and the seed is
  shared, so any token the int4 model chooses differently is a clear outlier; what
  limits the AUC is the share of messages in which int4 changes nothing early.
- **Covert channel.** Rinberg et al. bound exfiltratable information below 0.5% of the
  output channel; the policy bar is 0.01%, met here by construction at T > 0.
"""

REPRODUCE = """\
## Reproduce

```
ivp verify-report --quick --json                  # CI: tiny model, about a minute
ivp verify-report --model tiny --checkpoint /tmp/ivp-tiny      # the large tiny-model run
ivp verify-report --model gemma-3-270m --checkpoint /tmp/ivp-gemma   # headline (hours; resumes)
make report                                       # both full runs (heavy, not in CI)
ivp calibrate MODEL_DIR --model-id ID --manifest-out m.json --attention sdpa,eager \\
    --threads 1,2,4 --batch-sizes 1,2,4,8,12,16,32 --per-config 4   # δ into a manifest
ivp whitelist build --manifest m.json --version N+1 --expires-days 30 --key us.key --out wl.json
ivp whitelist sign wl.json --key cn.key           # quorum; then a whitelist_update admin request
```
"""

__all__ = ["CHANNEL", "INTRO", "LIMITS", "METHOD", "PEERS", "REPRODUCE", "SOUNDNESS"]
