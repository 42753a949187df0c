"""One answer about one image from an XTuner LLaVA fine-tune (runs on the host, in the llama3 env).

What ``xtuner chat LLM --visual-encoder CLIP --llava HF_DIR --prompt-template llama3_chat --image IMG``
does for its first turn, without the interactive loop (``xtuner chat`` ends with EOFError, exit 1,
when its input runs out). HF_DIR is ``xtuner convert pth_to_hf``'s output for a LLaVA config
(``llm_adapter/``, ``visual_encoder_adapter/``, ``projector/``; ``visual_encoder/`` when the encoder
was trained in full). Prints one JSON line: ``{"answer": ..., "new_tokens": N, "image_tokens": M}``.
"""

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionModel,
    GenerationConfig,
)
from xtuner.dataset.utils import expand2square, load_image
from xtuner.model.utils import prepare_inputs_labels_for_multimodal
from xtuner.tools.utils import get_stop_criteria
from xtuner.utils import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX, PROMPT_TEMPLATE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("llm")
    ap.add_argument("--visual-encoder", required=True)
    ap.add_argument("--llava", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", default="Describe this image.")
    ap.add_argument("--prompt-template", default="llama3_chat")
    ap.add_argument("--system", default="")
    ap.add_argument("--visual-select-layer", type=int, default=-2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"

    llm = AutoModelForCausalLM.from_pretrained(args.llm, torch_dtype=dtype).to(device)  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(args.llm)
    llava = Path(args.llava)
    ve_path = str(llava / "visual_encoder") if (llava / "visual_encoder").is_dir() else args.visual_encoder
    visual_encoder = CLIPVisionModel.from_pretrained(ve_path, torch_dtype=dtype).to(device)  # type: ignore[arg-type]
    image_processor = CLIPImageProcessor.from_pretrained(ve_path)
    if (llava / "llm_adapter").is_dir():
        llm = PeftModel.from_pretrained(llm, str(llava / "llm_adapter"))
    if (llava / "visual_encoder_adapter").is_dir():
        visual_encoder = PeftModel.from_pretrained(visual_encoder, str(llava / "visual_encoder_adapter"))
    projector = AutoModel.from_pretrained(str(llava / "projector"), torch_dtype=dtype,
                                          trust_remote_code=True).to(device)
    for m in (llm, visual_encoder, projector):
        m.eval()

    template = PROMPT_TEMPLATE[args.prompt_template]
    text = DEFAULT_IMAGE_TOKEN + "\n" + args.prompt
    prompt = (template["SYSTEM"].format(system=args.system) if args.system else "")
    prompt += template["INSTRUCTION"].format(input=text, round=1)
    with torch.no_grad():
        image = load_image(args.image)
        image = expand2square(image, tuple(int(x * 255) for x in image_processor.image_mean))
        pixel = image_processor.preprocess(image, return_tensors="pt")["pixel_values"].to(device, dtype)
        feats = visual_encoder(pixel, output_hidden_states=True).hidden_states[args.visual_select_layer][:, 1:]
        pixel_values = projector(feats)
        before, after = prompt.split(DEFAULT_IMAGE_TOKEN)
        ids = [*tokenizer.encode(before), IMAGE_TOKEN_INDEX, *tokenizer.encode(after, add_special_tokens=False)]
        mm = prepare_inputs_labels_for_multimodal(llm=llm, input_ids=torch.tensor([ids], device=device),
                                                  pixel_values=pixel_values)
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,  # type: ignore[no-untyped-call]
                               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                               else tokenizer.eos_token_id)
        stop = get_stop_criteria(tokenizer=tokenizer, stop_words=list(template.get("STOP_WORDS", [])))
        out = llm.generate(**mm, generation_config=gen, bos_token_id=tokenizer.bos_token_id, stopping_criteria=stop)
    # with inputs_embeds (no input_ids) generate returns only the new tokens
    answer = tokenizer.decode(out[0], skip_special_tokens=True)
    print(json.dumps({"answer": answer, "new_tokens": int(out.shape[1]), "image_tokens": int(pixel_values.shape[1]),
                      "image": args.image, "prompt": args.prompt}, ensure_ascii=False))


if __name__ == "__main__":
    main()
