// The tokenizer state: vocabulary and merge tables, the encode pipeline (added tokens ->
// normalizer -> pre-tokenizer -> BPE), the two merge loops and the per-piece cache.

#include "common/tokenizer_internal.h"

#include <atomic>
#include <climits>
#include <cstdio>
#include <deque>
#include <functional>
#include <queue>

namespace slowed_examples {
namespace detail {

namespace {

std::atomic<size_t> g_bpe_heap_threshold{64};

}  // namespace

void TokenizerImpl::set_token(int32_t id, const std::string& tok) {
  TORCH_CHECK(id >= 0, source, ": negative token id ", id, " for '", tok, "'");
  if (static_cast<size_t>(id) >= id_to_token.size()) id_to_token.resize(static_cast<size_t>(id) + 1);
  id_to_token[static_cast<size_t>(id)] = tok;
}

void TokenizerImpl::add_merge(const std::string& a, const std::string& b, size_t rank) {
  auto ia = vocab.find(a), ib = vocab.find(b), im = vocab.find(a + b);
  TORCH_CHECK(ia != vocab.end() && ib != vocab.end() && im != vocab.end(), source, ": merge '", a,
              " ", b, "' (rank ", rank, ") uses a token that is not in the vocabulary ('",
              ia == vocab.end() ? a : ib == vocab.end() ? b : a + b, "')");
  uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) |
                 static_cast<uint32_t>(ib->second);
  // A repeated pair keeps its first (lowest) rank, like tokenizers' HashMap::insert order.
  merges.emplace(key, (static_cast<uint64_t>(rank) << 32) | static_cast<uint32_t>(im->second));
}

// Called once every table is filled.
void TokenizerImpl::finish() {
  const auto& alpha = byte_alphabet();
  for (int b = 0; b < 256; ++b) {
    auto it = vocab.find(alpha.byte_to_utf8[b]);
    byte_id[b] = it == vocab.end() ? -1 : it->second;
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    auto fb = vocab.find(name);
    byte_fallback_id[b] = fb == vocab.end() ? -1 : fb->second;
  }
  special.assign(id_to_token.size(), 0);
  added_by_content.clear();
  for (size_t i = 0; i < added.size(); ++i) {
    const auto& t = added[i];
    set_token(t.id, t.content);
    added_by_content[t.content] = t.id;
    (t.normalized ? normalized_trie : raw_trie).add(t.content, static_cast<int32_t>(i));
  }
  special.assign(id_to_token.size(), 0);
  for (const auto& t : added)
    if (t.special) special[static_cast<size_t>(t.id)] = 1;
  token_bytes.assign(id_to_token.size(), std::string());
  for (size_t id = 0; id < id_to_token.size(); ++id) {
    const std::string& t = id_to_token[id];
    if (!alpha.unspell(t, token_bytes[id])) token_bytes[id] = t;
  }
}

// Calls on_text(segment) / on_token(added index) for the pieces of `text` split around
// added tokens (tokenizers' AddedVocabulary::find_matches).
template <typename OnText, typename OnToken>
void TokenizerImpl::split_added(std::string_view text, const AddedTrie& trie, OnText&& on_text,
                 OnToken&& on_token) const {
  if (trie.empty()) {
    if (!text.empty()) on_text(text);
    return;
  }
  size_t done = 0;  // text[0, done) is emitted
  size_t pos = 0;
  while (pos < text.size()) {
    if (!trie.may_start(static_cast<unsigned char>(text[pos]))) { ++pos; continue; }
    auto m = trie.longest_at(text, pos);
    if (m.second < 0) { ++pos; continue; }
    const AddedToken& t = added[static_cast<size_t>(m.second)];
    size_t start = pos, finish = m.first;
    if (t.single_word && ((start > 0 && ends_with_word_char(text.substr(0, start))) ||
                          (finish < text.size() && starts_with_word_char(text.substr(finish))))) {
      pos = finish;  // discarded; the search goes on after it
      continue;
    }
    if (t.lstrip) {
      size_t s = start;
      while (s > done) {
        size_t k = s - 1;
        while (k > done && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
        auto cp = utf8_decode(reinterpret_cast<const unsigned char*>(text.data()) + k, s - k);
        if (!is_white_space(cp)) break;
        s = k;
      }
      start = s;
    }
    if (t.rstrip) {
      while (finish < text.size()) {
        size_t len = utf8_len_from_lead(static_cast<unsigned char>(text[finish]));
        auto cp = utf8_decode(reinterpret_cast<const unsigned char*>(text.data()) + finish, len);
        if (!is_white_space(cp)) break;
        finish += len;
      }
    }
    if (start > done) on_text(text.substr(done, start - done));
    on_token(m.second);
    done = pos = finish;
  }
  if (done < text.size()) on_text(text.substr(done));
}

// tokenizers' AddedVocabulary::extract_and_normalize: cut the non-normalized added tokens
// out of the raw text, normalize what is left, cut the normalized added tokens out of that.
void TokenizerImpl::encode_text(std::string_view text, std::vector<int32_t>& out) const {
  auto on_added = [&](int32_t index) { out.push_back(added[static_cast<size_t>(index)].id); };
  auto on_normalized = [&](std::string_view s) {
    split_added(s, normalized_trie, [&](std::string_view piece) { pre_tokenize_and_bpe(piece, out); },
                on_added);
  };
  split_added(
      text, raw_trie,
      [&](std::string_view segment) {
        if (normalizers.empty()) {
          on_normalized(segment);
          return;
        }
        std::string norm(segment);
        for (const auto& form : normalizers) norm = unicode_normalize(norm, form);
        on_normalized(norm);
      },
      on_added);
}

void TokenizerImpl::pre_tokenize_and_bpe(std::string_view text, std::vector<int32_t>& out) const {
  std::vector<Piece> pieces{text}, next;
  std::deque<std::string> owned;  // pieces a ByteLevel(add_prefix_space) step rewrote
  for (const auto& st : steps) {
    next.clear();
    if (st.kind == PreTokStep::Kind::ByteLevel) {
      std::vector<Piece>* src = &pieces;
      std::vector<Piece> prefixed;
      if (st.add_prefix_space) {
        for (Piece p : pieces) {
          if (!p.empty() && p[0] != ' ') {
            owned.push_back(" " + std::string(p));
            prefixed.push_back(owned.back());
          } else {
            prefixed.push_back(p);
          }
        }
        src = &prefixed;
      }
      if (st.regex) {
        apply_split(st, *src, next);
      } else {
        next = *src;
      }
    } else {
      apply_split(st, pieces, next);
    }
    pieces.swap(next);
  }
  for (Piece p : pieces) bpe_cached(p, out);
}

void TokenizerImpl::bpe_cached(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (piece.size() == 1 && byte_id[static_cast<unsigned char>(piece[0])] >= 0) {
    out.push_back(byte_id[static_cast<unsigned char>(piece[0])]);
    return;
  }
  thread_local std::string key;
  key.assign(piece.data(), piece.size());
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(key);
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  bpe(piece, ids);
  out.insert(out.end(), ids.begin(), ids.end());
  std::lock_guard<std::mutex> lock(cache_mutex);
  if (cache.size() >= kCacheCapacity) cache.clear();
  cache.emplace(key, std::move(ids));
}

// (rank, merged id) of a pair, rank = UINT32_MAX when absent.
std::pair<uint32_t, int32_t> TokenizerImpl::merge_of(int32_t a, int32_t b) const {
  auto it = merges.find((static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b));
  if (it == merges.end()) return {UINT32_MAX, -1};
  return {static_cast<uint32_t>(it->second >> 32), static_cast<int32_t>(it->second & 0xFFFFFFFFu)};
}

void TokenizerImpl::bpe(std::string_view piece, std::vector<int32_t>& ids) const {
  const auto& alpha = byte_alphabet();
  if (ignore_merges) {
    auto it = vocab.find(alpha.spell(piece));
    if (it != vocab.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  // Initial symbols: one per byte (each byte is one character of the byte-level spelling).
  std::vector<int32_t> syms;
  syms.reserve(piece.size());
  bool last_unk = false;
  for (unsigned char c : piece) {
    int32_t id = byte_id[c];
    if (id >= 0) {
      syms.push_back(id);
      last_unk = false;
    } else if (byte_fallback && byte_fallback_id[c] >= 0) {
      syms.push_back(byte_fallback_id[c]);
      last_unk = false;
    } else if (model_unk >= 0) {
      if (!(fuse_unk && last_unk)) syms.push_back(model_unk);
      last_unk = true;
    }  // else: dropped, as tokenizers' BPE does without unk_token
  }
  if (syms.size() < 2) {
    ids = std::move(syms);
    return;
  }
  if (piece.size() >= g_bpe_heap_threshold.load(std::memory_order_relaxed))
    merge_heap(syms);
  else
    merge_ranks(syms);
  ids = std::move(syms);
}

// O(n^2): keep the rank of every adjacent pair; merge the lowest (leftmost on ties).
void TokenizerImpl::merge_ranks(std::vector<int32_t>& syms) const {
  std::vector<std::pair<uint32_t, int32_t>> pr(syms.size() - 1);
  for (size_t i = 0; i + 1 < syms.size(); ++i) pr[i] = merge_of(syms[i], syms[i + 1]);
  while (!pr.empty()) {
    size_t best = 0;
    for (size_t i = 1; i < pr.size(); ++i)
      if (pr[i].first < pr[best].first) best = i;
    if (pr[best].first == UINT32_MAX) break;
    syms[best] = pr[best].second;
    syms.erase(syms.begin() + static_cast<std::ptrdiff_t>(best) + 1);
    pr.erase(pr.begin() + static_cast<std::ptrdiff_t>(best));
    if (best > 0) pr[best - 1] = merge_of(syms[best - 1], syms[best]);
    if (best < pr.size()) pr[best] = merge_of(syms[best], syms[best + 1]);
  }
}

// O(n log n): tokenizers' Word::merge_all (linked symbols + a min-heap on (rank, position),
// stale entries skipped).
void TokenizerImpl::merge_heap(std::vector<int32_t>& syms) const {
  struct Sym {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  struct Cand {
    uint32_t rank;
    int32_t pos;
    int32_t merged;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  const int32_t n = static_cast<int32_t>(syms.size());
  std::vector<Sym> s(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) s[static_cast<size_t>(i)] = {syms[static_cast<size_t>(i)], i - 1, i + 1 < n ? i + 1 : -1, true};
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  for (int32_t i = 0; i + 1 < n; ++i) {
    auto m = merge_of(s[static_cast<size_t>(i)].id, s[static_cast<size_t>(i + 1)].id);
    if (m.first != UINT32_MAX) heap.push({m.first, i, m.second});
  }
  while (!heap.empty()) {
    Cand top = heap.top();
    heap.pop();
    Sym& a = s[static_cast<size_t>(top.pos)];
    if (!a.alive || a.next < 0) continue;
    Sym& b = s[static_cast<size_t>(a.next)];
    if (merge_of(a.id, b.id).second != top.merged) continue;  // stale entry
    a.id = top.merged;
    b.alive = false;
    a.next = b.next;
    if (b.next >= 0) s[static_cast<size_t>(b.next)].prev = top.pos;
    if (a.prev >= 0) {
      auto m = merge_of(s[static_cast<size_t>(a.prev)].id, a.id);
      if (m.first != UINT32_MAX) heap.push({m.first, a.prev, m.second});
    }
    if (a.next >= 0) {
      auto m = merge_of(a.id, s[static_cast<size_t>(a.next)].id);
      if (m.first != UINT32_MAX) heap.push({m.first, top.pos, m.second});
    }
  }
  syms.clear();
  for (int32_t i = 0; i >= 0; i = s[static_cast<size_t>(i)].next) syms.push_back(s[static_cast<size_t>(i)].id);
}

void set_bpe_heap_threshold(size_t bytes) { g_bpe_heap_threshold.store(bytes); }
size_t bpe_heap_threshold() { return g_bpe_heap_threshold.load(); }

}  // namespace detail
}  // namespace slowed_examples
