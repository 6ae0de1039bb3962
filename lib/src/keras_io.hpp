// Keras weights files: Keras 2 HDF5 (save_weights / model.save) and Keras 3 .weights.h5.
#pragma once

#include <string>

#include "nn.hpp"

namespace bnlab {

/// Loads a Keras weights file into `model`, matching layers by order and kind: the i-th Dense
/// layer with weights to the i-th Linear (kernel [in, out] transposed to weight [out, in]),
/// the i-th BatchNormalization to the i-th BatchNorm (gamma, beta, moving_mean,
/// moving_variance). Any mismatch of count, kind or shape is an InputError naming the layer,
/// the dataset and both shapes. Reads both the Keras 2 layout (a "layer_names" attribute, one
/// group per layer with "weight_names") and the Keras 3 layout (layers/<name>/vars/<i>).
void import_keras_h5(const std::string& path, ModelImpl& model);

/// Writes `model`'s weights as a Keras 2 HDF5 weights file (what save_weights writes), atomically.
void export_keras_h5(const std::string& path, const ModelImpl& model);

}  // namespace bnlab
