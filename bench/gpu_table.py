"""Markdown table of a ``bench/gpu_check.py`` JSON file, with fastseq/cuDNN ratios.

Usage: ``python bench/gpu_table.py bench/results/gpu_check_....json``
"""
import json
import sys


def main(path):
    d = json.load(open(path))
    print(f"GPU: {d.get('gpu')}; torch {d.get('torch')}, cuDNN {d.get('cudnn')}, "
          f"numba {d.get('numba')}; all checks ok: {d.get('all_ok')}\n")
    print("| B | H | fastseq LSTM ms | cuDNN fp32 ms | cuDNN / fastseq | cuDNN tf32 ms "
          "| fastseq rel err | Dense+softmax ms | GB/s | Linear+softmax ms | fused kernel ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in d["rows"]:
        if "error" in r:
            print(f"| {r['B']} | {r['H']} | error: {r['error'].splitlines()[-1]} |")
            continue
        f, c = r["t_fastseq_lstm_ms"], r["t_torch_lstm_fp32_ms"]
        print(f"| {r['B']} | {r['H']} | {f:.3f} | {c:.3f} | {c / f:.2f} | "
              f"{r['t_torch_lstm_tf32_ms']:.3f} | {r['rel_err_lstm']:.1e} | "
              f"{r['t_fastseq_dense_ms']:.3f} | {r['dense_GBps']:.0f} | "
              f"{r['t_torch_dense_ms']:.3f} | "
              + (f"{r['t_fastseq_dense_fused_ms']:.3f} |" if "t_fastseq_dense_fused_ms" in r
                 else "- |"))
    for t in d.get("training") or []:
        if "t_fastseq_vjp_auto_ms" in t and "t_torch_fwd_bwd_ms" in t:
            print(f"\nBPTT B={t['B']} T={t['T']} D={t['D']} H={t['H']}: fastseq lstm_vjp "
                  f"{t['t_fastseq_vjp_auto_ms']:.2f} ms ({t.get('path_auto')}; "
                  f"stepwise {t['t_fastseq_vjp_stepwise_ms']:.2f} ms; host copies "
                  f"included), PyTorch cuDNN forward+backward "
                  f"{t['t_torch_fwd_bwd_ms']:.2f} ms")

if __name__ == "__main__":
    main(sys.argv[1])
