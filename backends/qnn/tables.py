"""QNN's names and codes: datatypes, quantization encodings, tensor types and the ONNX -> qti.aisw op map."""

from __future__ import annotations

# Qnn_DataType_t codes (QnnTypes.h): 0x0X08 / 0x0X16 / 0x0X32, the high byte the family.
QNN_DATATYPES = {
    "QNN_DATATYPE_INT_8": 0x0008, "QNN_DATATYPE_INT_16": 0x0016, "QNN_DATATYPE_INT_32": 0x0032,
    "QNN_DATATYPE_INT_64": 0x0064, "QNN_DATATYPE_UINT_8": 0x0108, "QNN_DATATYPE_UINT_16": 0x0116,
    "QNN_DATATYPE_UINT_32": 0x0132, "QNN_DATATYPE_UINT_64": 0x0164, "QNN_DATATYPE_FLOAT_16": 0x0216,
    "QNN_DATATYPE_FLOAT_32": 0x0232, "QNN_DATATYPE_SFIXED_POINT_4": 0x0304,
    "QNN_DATATYPE_SFIXED_POINT_8": 0x0308, "QNN_DATATYPE_SFIXED_POINT_16": 0x0316,
    "QNN_DATATYPE_UFIXED_POINT_4": 0x0404, "QNN_DATATYPE_UFIXED_POINT_8": 0x0408,
    "QNN_DATATYPE_SFIXED_POINT_32": 0x0332, "QNN_DATATYPE_UFIXED_POINT_16": 0x0416,
    "QNN_DATATYPE_BOOL_8": 0x0508,
}
PLAIN_DATATYPES = {
    "float32": "QNN_DATATYPE_FLOAT_32", "float16": "QNN_DATATYPE_FLOAT_16", "int64": "QNN_DATATYPE_INT_64",
    "int32": "QNN_DATATYPE_INT_32", "int16": "QNN_DATATYPE_INT_16", "int8": "QNN_DATATYPE_INT_8",
    "uint8": "QNN_DATATYPE_UINT_8", "uint16": "QNN_DATATYPE_UINT_16", "bool": "QNN_DATATYPE_BOOL_8",
}
# Qnn_QuantizationEncoding_t
QNN_QUANT_ENCODINGS = {
    "QNN_QUANTIZATION_ENCODING_SCALE_OFFSET": 0, "QNN_QUANTIZATION_ENCODING_AXIS_SCALE_OFFSET": 1,
    "QNN_QUANTIZATION_ENCODING_BW_SCALE_OFFSET": 2, "QNN_QUANTIZATION_ENCODING_BW_AXIS_SCALE_OFFSET": 3,
    "QNN_QUANTIZATION_ENCODING_BLOCK": 4,
}
QNN_DEFINITION_DEFINED = 1
# Qnn_TensorType_t
TENSOR_TYPES = {"APP_WRITE": 0, "APP_READ": 1, "NATIVE": 3, "STATIC": 4}

# ONNX op -> qti.aisw op type (QNN's op definitions). Data-invariant shape ops (Shape, Range,
# ConstantOfShape...) have no QNN op: the converter folds them once input shapes are fixed.
QNN_OPS = {
    "Add": "ElementWiseAdd", "Sub": "ElementWiseSubtract", "Mul": "ElementWiseMultiply",
    "Div": "ElementWiseDivide", "Pow": "ElementWisePower", "Sqrt": "ElementWiseSquareRoot",
    "Reciprocal": "ElementWiseDivide", "Neg": "ElementWiseNeg", "Exp": "ElementWiseExp",
    "Log": "ElementWiseLog", "Sin": "ElementWiseSin", "Cos": "ElementWiseCos", "Abs": "ElementWiseAbs",
    "Floor": "ElementWiseFloor", "Ceil": "ElementWiseCeil", "Max": "ElementWiseMaximum",
    "Min": "ElementWiseMinimum", "Equal": "ElementWiseEqual", "Less": "ElementWiseLess",
    "LessOrEqual": "ElementWiseLessEqual", "Greater": "ElementWiseGreater",
    "GreaterOrEqual": "ElementWiseGreaterEqual", "And": "ElementWiseAnd", "Or": "ElementWiseOr",
    "Not": "ElementWiseNot", "Where": "ElementWiseSelect", "Sigmoid": "Sigmoid", "Tanh": "Tanh",
    "Relu": "Relu", "Gelu": "Gelu", "Erf": "ElementWiseErf", "HardSwish": "HardSwish",
    "Clip": "ReluMinMax", "Softmax": "Softmax", "LogSoftmax": "LogSoftmax",
    "LayerNormalization": "LayerNorm", "RMSNormalization": "RmsNorm", "BatchNormalization": "Batchnorm",
    "InstanceNormalization": "InstanceNorm", "MatMul": "MatMul", "Gemm": "FullyConnected",
    "Conv": "Conv2d", "ConvTranspose": "TransposeConv2d", "MaxPool": "PoolMax2d",
    "AveragePool": "PoolAvg2d", "GlobalAveragePool": "PoolAvg2d", "Gather": "Gather",
    "GatherND": "GatherNd", "GatherElements": "GatherElements", "ScatterND": "ScatterNd",
    "Reshape": "Reshape", "Flatten": "Reshape", "Squeeze": "Reshape", "Unsqueeze": "Reshape",
    "Transpose": "Transpose", "Concat": "Concat", "Split": "Split", "Slice": "StridedSlice",
    "Expand": "ElementWiseMultiply", "Tile": "Tile", "Pad": "Pad", "Resize": "Resize",
    "ReduceMean": "ReduceMean", "ReduceSum": "ReduceSum", "ReduceMax": "ReduceMax",
    "ReduceMin": "ReduceMin", "ReduceProd": "ReduceProd", "ArgMax": "Argmax", "ArgMin": "Argmin",
    "TopK": "TopK", "CumSum": "CumulativeSum", "Cast": "Cast", "DepthToSpace": "DepthToSpace",
    "SpaceToDepth": "SpaceToDepth", "PRelu": "Prelu", "LeakyRelu": "Prelu", "Elu": "Elu",
}
FOLDED_OPS = {"Shape", "Range", "ConstantOfShape", "Size", "Identity", "Constant"}
WEIGHT_OPS = {"FullyConnected", "Conv2d", "TransposeConv2d", "MatMul"}
