"""WiSE-FT post hoc: one run's weights interpolated with its zero-shot start, for each alpha.

Wortsman et al., CVPR 2022: each alpha's (1 - alpha) theta_0 + alpha theta_final of one
finished run, no retraining (mlfoundations/wise-ft src/wise_ft.py::_merge; bench.losses.interpolate).

Per run: the rows go into the run's own results.jsonl as variants wise:<alpha> (`bench wise RUN`, or
`bench combine --combiner wise`), replacing earlier rows of the same alphas. The fine-tuning-time form is the
method `wise_ft` (methods/wise_ft.py); `wise_alphas:` in a run config evaluates the same variants at its end.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.combine import Combined, Combiner, register_combiner
from bench.errors import BenchError
from bench.losses import interpolate
from bench.wise import DEFAULT_ALPHAS, variant_name


@register_combiner("wise")
class WiSE(Combiner):
    per_run = True
    min_members = 1

    @dataclass(frozen=True)
    class Options:
        alphas: tuple[float, ...] = DEFAULT_ALPHAS  # 0: the zero-shot weights, 1: the fine-tuned ones

    def __init__(self, options=None):
        super().__init__(options)
        bad = [a for a in self.options.alphas if not 0.0 <= a <= 1.0]
        if bad:
            raise BenchError(f"--alphas: {bad[0]} is outside [0, 1]")

    def variants(self):
        return [variant_name(a) for a in self.options.alphas]

    def combine(self, ctx):
        (member,) = ctx.members
        for alpha in self.options.alphas:
            yield Combined(variant_name(alpha), interpolate(ctx.theta0, member.state, alpha), [member.job_id],
                           {"alpha": alpha})
