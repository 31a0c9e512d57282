"""UniMatch (Yang et al., CVPR 2023) on the mean-teacher template: FixMatch's per-term loss on a
wider skeleton. The defaults are V1 as published (`config.DEFAULT_SKELETONS`):

- pseudo-labels from the student's own clean weak-view prediction, detached (``teacher=online``);
- two strong views, each with its own photometric draw and CutMix box (``strong_views=2``);
- a feature-perturbed weak view: channel dropout (p = 0.5) on the low- and high-level encoder
  features, decoded in the same forward as the clean weak view (``feature_perturbation=dropout``);
- threshold 0.95, each unlabeled term divided by the valid pixels, and

      L = (L_sup + 0.25·L_s1 + 0.25·L_s2 + 0.5·L_fp) / 2

  (`loss_scale` ½, ``method.fp_share`` 0.5, times λ_u·r(t) as every mean-teacher method here).

UniMatch V2 is the same method with ``teacher=ema`` (momentum 0.996) and
``feature_perturbation=complementary``: L = (L_sup + (L_s1 + L_s2)/2) / 2.
"""

from __future__ import annotations

from farcluss.methods.fixmatch import FixMatch


class UniMatch(FixMatch):
    name = "unimatch"
    loss_scale = 0.5
