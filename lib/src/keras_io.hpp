// Keras weights files: Keras 2 HDF5 (save_weights / model.save) and Keras 3 .weights.h5.
#pragma once

#include <string>
#include <vector>

#include "nn.hpp"

namespace bnlab {

/// Loads a Keras weights file into `model`, matching layers by order and kind: the i-th Dense
/// layer with weights to the i-th Linear (kernel [in, out] transposed to weight [out, in]),
/// the i-th BatchNormalization to the i-th BatchNorm (gamma, beta, moving_mean,
/// moving_variance). Any mismatch of count, kind or shape is an InputError naming the layer,
/// the dataset and both shapes. Reads both the Keras 2 layout (a "layer_names" attribute, one
/// group per layer with "weight_names") and the Keras 3 layout (layers/<name>/vars/<i>).
void import_keras_h5(const std::string& path, ModelImpl& model);

/// Loads a Keras model file's weights into `model`, whose layers came from that file's config
/// (keras_architecture): each module by its Keras layer, `keras_name` (Keras 2:
/// model_weights/<name>) or `weights_key` (Keras 3: layers/<class_counter>/vars/<i>), never by
/// sorting names. Any missing layer, count or shape that does not fit is an InputError.
void import_keras_model(const std::string& path, ModelImpl& model, const std::vector<std::string>& keras_name,
                        const std::vector<std::string>& weights_key);

/// Writes `model`'s weights as a Keras 2 HDF5 weights file (what save_weights writes), atomically.
void export_keras_h5(const std::string& path, const ModelImpl& model);

}  // namespace bnlab
