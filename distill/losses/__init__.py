"""Pure loss functions of tensors. None of them knows about models; all softmaxes run in fp32."""
