#include "native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("range_attention", &range_attention, "attention over one contiguous key range per query (CPU forward)");
  m.def("range_attention_backward", &range_attention_backward, "the gradients of range_attention (CPU)");
  m.def("box_attention", &box_attention, "attention over one box of keys per query on a grid (CPU forward)");
  m.def("linear_chunks", &linear_chunks,
        "causal chunked linear attention, per-head decay or per-channel gates (CPU forward)");
  m.def("linear_chunks_backward", &linear_chunks_backward, "the gradients of linear_chunks' raw causal form (CPU)");
  m.def("linear_noncausal", &linear_noncausal, "non-causal linear attention without decay (CPU forward)");
  m.def("linear_noncausal_backward", &linear_noncausal_backward, "the gradients of linear_noncausal (CPU)");
  m.def("map_features", &map_features, "the linear kernels' feature maps as one pass (CPU)");
  m.def("memory_chunks", &memory_chunks, "Titans' neural memory, chunked form (CPU forward)");
  m.def("memory_chunks_backward", &memory_chunks_backward, "gradients of memory_chunks");
  m.def("agent_chunks", &agent_chunks, "agent attention's causal chunked form (CPU forward)");
  m.def("agent_noncausal", &agent_noncausal, "non-causal agent attention (CPU forward)");
  m.def("agent_noncausal_backward", &agent_noncausal_backward, "the gradients of agent_noncausal (CPU)");
  m.def("aaren_scan", &aaren_scan, "Aaren's prefix outputs of one query, as an RNN (CPU forward)");
  m.def("aaren_scan_backward", &aaren_scan_backward, "the gradients of aaren_scan, one reverse pass (CPU)");
  m.def("rat_finals", &rat_finals, "RAT's chunk final summaries (CPU forward)");
  m.def("rat_finals_backward", &rat_finals_backward, "the gradients of rat_finals (CPU)");
  m.def("rat_chunks", &rat_chunks, "RAT's causal chunked form (CPU forward)");
  m.def("rat_chunks_backward", &rat_chunks_backward, "the gradients of rat_chunks (CPU)");
}
