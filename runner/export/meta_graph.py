"""The export's TF1 MetaGraph that restores its variables from the SavedModel's own checkpoint.

    saver = tf.compat.v1.train.import_meta_graph("EXPORT/variables/variables.meta")
    saver.restore(sess, tf.train.latest_checkpoint("EXPORT/variables"))

The serving function's graph is kept as it is, except that each captured variable becomes a VarHandleOp
and the saver maps the SavedModel checkpoint's object-based keys (`backbone/.../.ATTRIBUTES/VARIABLE_VALUE`)
to them: the MetaGraph holds no weights, only the graph (node names shortened, interface names kept), and
a `checkpoint` state file beside `variables.index` lets `tf.train.latest_checkpoint` find it.
"""
from __future__ import annotations

from pathlib import Path

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2
from tensorflow.python.trackable.base import SaveType

from runner.run.checkpoint_state import write_checkpoint_state

VARIABLES_DIR = "variables"                 # the SavedModel's checkpoint folder
VARIABLES_PREFIX = "variables"              # its checkpoint prefix inside that folder
META_GRAPH_FILE = f"{VARIABLES_DIR}/{VARIABLES_PREFIX}.meta"  # beside the checkpoint, as TF1 savers put it
_DROPPED_ATTRS = ("_output_shapes", "_has_manual_control_dependencies", "_class")  # hints that cost bytes


def serving_tensor_names(function, graph_function, nodes: set[str]) -> dict:
    """The input and output tensor names of the serving `function` in an exported graph made from
    `graph_function` (itself or its frozen twin): the ops named inside Classifier._serve ("probabilities:0")
    when the graph has them, else the generated output names."""
    keys = sorted(function.structured_outputs)  # tf.nest flattens a dict in sorted key order
    names = {key: f"{key}:0" if key in nodes else tensor.name for key, tensor in zip(keys, graph_function.outputs)}
    return {"input": graph_function.inputs[0].name, "probabilities": names["probabilities"],
            "top_k_indices": names["top_k_indices"], "classes": names["top_k_classes"]}


def tf_variable(trackable):
    """The tf.Variable behind a Keras 3 variable (which wraps one); any other object as it is."""
    value = getattr(trackable, "value", None)
    return value if isinstance(value, tf.Variable) else trackable


def checkpoint_keys(root: tf.Module, prefix: str) -> dict[int, tuple[str, tf.Variable]]:
    """id(variable handle) → (its key in the checkpoint `prefix` that tf.saved_model.save wrote for `root`, the
    variable): the checkpoint's own object graph is walked alongside the live objects, so a variable reachable
    by several paths (ConvNeXt's layers are) gets the key the checkpoint actually holds."""
    stored = trackable_object_graph_pb2.TrackableObjectGraph()
    stored.ParseFromString(tf.train.load_checkpoint(prefix).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    live, queue, keys = {0: root}, [0], {}
    while queue:
        node_id = queue.pop()
        trackable = live[node_id]
        node = stored.nodes[node_id]
        children = trackable._trackable_children(save_type=SaveType.CHECKPOINT)  # noqa: SLF001 - TF's own walk
        for child in node.children:
            if child.node_id not in live and child.local_name in children:
                live[child.node_id] = children[child.local_name]
                queue.append(child.node_id)
        variable = tf_variable(trackable)
        for attribute in node.attributes:
            if attribute.name == "VARIABLE_VALUE" and hasattr(variable, "handle"):
                keys[id(variable.handle)] = attribute.checkpoint_key, variable
    return keys


def _variables_graph_def(function, keys) -> tuple[tf.compat.v1.GraphDef, dict[str, tuple[str, tf.DType]]]:
    """The function's GraphDef with each captured variable a VarHandleOp (and other captures constants);
    returns it and node name → (checkpoint key, dtype)."""
    graph_def = function.graph.as_graph_def()
    nodes = {node.name: node for node in graph_def.node}
    variables = {}
    for external, internal in function.graph.captures:
        node = nodes[internal.op.name]
        node.ClearField("attr")
        if external.dtype == tf.resource:
            key, variable = keys[id(external)]
            node.op = "VarHandleOp"
            node.attr["dtype"].type = variable.dtype.as_datatype_enum
            node.attr["shape"].shape.CopyFrom(tf.TensorShape(variable.shape).as_proto())
            variables[node.name] = key, variable.dtype
        else:  # a captured constant (the class names)
            node.op = "Const"
            node.attr["dtype"].type = external.dtype.as_datatype_enum
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(external.numpy()))
    return graph_def, variables


def _shorten_names(graph_def, keep: set[str]) -> dict[str, str]:
    """Rename every node not in `keep` to a short name, in place (the names are most of a graph's bytes)."""
    renamed = {node.name: node.name if node.name in keep else f"n{i:x}" for i, node in enumerate(graph_def.node)}

    def reference(text: str) -> str:
        control = "^" if text.startswith("^") else ""
        name, colon, port = text.lstrip("^").partition(":")
        return control + renamed[name] + colon + port
    for node in graph_def.node:
        node.name = renamed[node.name]
        inputs = [reference(text) for text in node.input]
        del node.input[:]
        node.input.extend(inputs)
        node.device = ""  # no device pins: a graph exported on a GPU must load on a CPU-only machine
        for attr in _DROPPED_ATTRS:
            node.attr.pop(attr, None)
        if node.op == "VarHandleOp":
            node.attr["shared_name"].s = node.name.encode()
    return renamed


def write_meta_graph(function, root: tf.Module, saved_model_dir: Path) -> dict:
    """Write the MetaGraph of `function` (a concrete function of `root`, already saved by tf.saved_model.save
    into `saved_model_dir`) and the checkpoint state file of variables/; return what model.json says of it."""
    prefix = str(saved_model_dir / VARIABLES_DIR / VARIABLES_PREFIX)
    graph_def, variables = _variables_graph_def(function, checkpoint_keys(root, prefix))
    stored = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    missing = [key for key, _ in variables.values() if key not in stored]
    if missing:
        raise RuntimeError(f"the SavedModel in {saved_model_dir} lacks {len(missing)} variables the serving graph "
                           f"reads (e.g. {missing[0]}); the MetaGraph could not be tied to its checkpoint")
    interface = {t.op.name for t in [*function.inputs[:1], *function.outputs]} | set(function.structured_outputs)
    renamed = _shorten_names(graph_def, interface)
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        var_list = {}
        for name, (key, dtype) in variables.items():
            handle = graph.get_tensor_by_name(f"{renamed[name]}:0")
            reads = [op for op in handle.consumers() if op.type == "ReadVariableOp"]
            var_list[key] = reads[0].outputs[0] if reads else tf.raw_ops.ReadVariableOp(resource=handle, dtype=dtype)
        saver = tf.compat.v1.train.Saver(var_list=var_list, sharded=False, name="saver")
        meta_graph = saver.export_meta_graph(clear_devices=True, strip_default_attrs=True)
    for node in meta_graph.graph_def.node:  # export_meta_graph adds the shapes again
        for attr in _DROPPED_ATTRS:
            node.attr.pop(attr, None)
    (saved_model_dir / META_GRAPH_FILE).write_bytes(meta_graph.SerializeToString())
    write_checkpoint_state(saved_model_dir / VARIABLES_DIR, [VARIABLES_PREFIX])
    nodes = {node.name for node in meta_graph.graph_def.node}
    return {"meta_graph": META_GRAPH_FILE, "checkpoint_dir": VARIABLES_DIR,
            **serving_tensor_names(function, function, nodes)}
