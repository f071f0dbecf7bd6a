import collections
from paddle.profiler import Profiler, ProfilerTarget

def count_kernels(fn):
    prof = Profiler(targets=[ProfilerTarget.CPU], on_trace_ready=lambda p: None)
    prof.start(); fn(); prof.stop()
    names = collections.Counter(); kinds = collections.Counter()
    def walk(node, top):
        kind = node.type.name
        kinds[kind] += 1
        if kind == "Operator": names[node.name] += 1
        for c in node.children_node: walk(c, False)
    for root in prof.profiler_result.get_data().values():
        for c in root.children_node: walk(c, True)
    return {"operators": kinds["Operator"], "launches": kinds["DygraphKernelLaunch"], "names": names}
