"""Seed-style Keras training, once with keras.layers.BatchNormalization and once with bncore's, from the
same initial weights: prints a JSON line of the largest differences (run with KERAS_BACKEND set)."""
import json
import sys

import keras
import numpy as np

from bncore.keras import BatchNormalization


def model(norm, renorm):
    kwargs = {"renorm": True, "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}} if renorm else {}
    return keras.Sequential([
        keras.Input((12,)),
        # no bias before the norm: its gradient is exactly zero in theory (the norm subtracts the mean),
        # so Adam steps it by rounding noise, differently in any two libraries (and moving_mean with it)
        keras.layers.Dense(16, use_bias=False),
        norm(axis=1, momentum=0.9, **kwargs),
        keras.layers.Activation("relu"),
        keras.layers.Dense(3, activation="softmax"),
    ])


def main(renorm):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((96, 12)) * 2 + 0.5).astype("float32")
    y = rng.integers(0, 3, 96)
    keras.utils.set_random_seed(1)
    stock = model(keras.layers.BatchNormalization, renorm)
    ours = model(BatchNormalization, renorm)
    ours.set_weights(stock.get_weights())  # weights interchange: the same variables in the same order
    assert isinstance(ours.layers[1], BatchNormalization)
    histories = []
    for m in (stock, ours):
        m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
        histories.append(m.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0).history["loss"])
    pairs = zip(stock.get_weights(), ours.get_weights())
    weights = max(float(np.max(np.abs(a - b) / (1 + np.abs(a)))) for a, b in pairs)
    losses = max(abs(a - b) / (1 + abs(a)) for a, b in zip(*histories))
    outputs = [keras.ops.convert_to_numpy(m(x, training=False)) for m in (stock, ours)]
    inference = float(np.max(np.abs(outputs[0] - outputs[1])))
    print(json.dumps({"weights": weights, "losses": losses, "inference": inference, "loss": histories[1][-1],
                      "first_loss": histories[1][0]}))


if __name__ == "__main__":
    main(renorm="--renorm" in sys.argv)
