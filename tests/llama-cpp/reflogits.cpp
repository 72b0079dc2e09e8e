// Prints llama.cpp's top-20 logits after a prompt given as token ids (argv[2] = "1,2,3"),
// with the settings llama-cpp-python 0.3.36 uses by default (n_batch 512, no flash attention).
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <string>
#include <algorithm>
int main(int argc, char ** argv) {
    llama_backend_init();
    auto mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    auto cp = llama_context_default_params();
    cp.n_ctx = 4096; cp.n_batch = 512; cp.n_ubatch = 512; cp.n_threads = 2; cp.n_threads_batch = 2;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, cp);
    std::vector<llama_token> toks;
    std::string s = argv[2];
    size_t p = 0;
    while (p < s.size()) { size_t q = s.find(',', p); if (q == std::string::npos) q = s.size(); toks.push_back(atoi(s.substr(p, q - p).c_str())); p = q + 1; }
    for (size_t i = 0; i < toks.size(); i += 512) {
        int n = std::min<size_t>(512, toks.size() - i);
        if (llama_decode(ctx, llama_batch_get_one(toks.data() + i, n))) { fprintf(stderr, "decode failed\n"); return 1; }
    }
    const int nv = llama_vocab_n_tokens(llama_model_get_vocab(model));
    float * lg = llama_get_logits_ith(ctx, -1);
    std::vector<int> idx(nv); for (int i = 0; i < nv; i++) idx[i] = i;
    std::partial_sort(idx.begin(), idx.begin() + 20, idx.end(), [&](int a, int b) { return lg[a] > lg[b]; });
    printf("[");
    for (int i = 0; i < 20; i++) printf("%s[%d, %f]", i ? ", " : "", idx[i], lg[idx[i]]);
    printf("]\n");
}
