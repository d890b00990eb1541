"""The job service's HTTP API, in parts: runtime.server puts them together.

`limits`: the body limit and output caps; `models`: the bodies; `deps`: what
a route needs (its store, its caller's scope); `admin` and `agent`: the
routes of each kind of caller.
"""
