"""The CLI's verbs that are not training stages: eval, data synth (and its AI-feedback methods), chat, export, serve
(a reward model over HTTP).

Entry points like `rlhf.cli` and `rlhf.stages`: they build on the library and nothing in the library imports
them.
"""
