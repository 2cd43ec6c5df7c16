"""The operator's console in the browser, served by ``mesh ops serve`` beside /metrics, /healthz and
/readyz: overview, jobs (with a live trace), dead letters, approvals and breakers, each action through
the function its CLI command uses. Access: :mod:`.auth`; routes: :mod:`.app`; reads: :mod:`.views`;
actions: :mod:`.actions`; the live stream: :mod:`.live`."""
