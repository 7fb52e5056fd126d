def sweep(*a, **k): raise NotImplementedError
def sweep_members(*a, **k): raise NotImplementedError
def report_sweep(*a, **k): raise NotImplementedError
