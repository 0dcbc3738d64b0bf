#pragma once

// Chat templates without a Jinja engine: the two formats the students use, recognized from the
// template source (GGUF tokenizer.chat_template, tokenizer_config.json's chat_template or
// chat_template.jinja) and rendered in C++ to the string transformers' apply_chat_template
// gives for system / user / assistant messages (no tools).
//
//   ChatML (SmolLM2, Qwen2.5):   <|im_start|>{role}\n{content}<|im_end|>\n ...
//     A default system message is inserted when the first message is not a system message,
//     if the template has one: it is read from the template's literal
//     '<|im_start|>system\n...<|im_end|>\n' (SmolLM2-Instruct: "You are a helpful AI
//     assistant named SmolLM, trained by Hugging Face"; Qwen2.5-Instruct: "You are Qwen,
//     created by Alibaba Cloud. You are a helpful assistant."). add_generation_prompt appends
//     "<|im_start|>assistant\n". Content is not trimmed.
//   Llama 3 (Llama-3-Instruct):  {bos}<|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>
//   Llama 3.1 / 3.2:             {bos}<|start_header_id|>system<|end_header_id|>\n\n
//                                Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n
//                                {system content|trim}<|eot_id|> then the other messages as
//                                above; the system block is always written. {date} is
//                                ChatTemplateOptions::date_string, else today's date
//                                ("%d %b %Y", what transformers' strftime_now gives) when the
//                                template calls strftime_now, else "26 Jul 2024" (Llama 3.1).
//   add_generation_prompt appends "<|start_header_id|>assistant<|end_header_id|>\n\n".
//
//   Plain (no template: base models such as BLOOM; only on request, see from_tokenizer):
//                                {system}\n\n{user} {assistant}{eos}  (messages after the first are
//                                separated by "\n\n", an assistant reply by one space and ended
//                                by the EOS token text so that a model learns to stop);
//                                add_generation_prompt adds nothing.
//
// The rendered string already holds the special tokens (and Llama's BOS): encode it with
// add_special_tokens = false, as transformers' apply_chat_template(tokenize=True) does.
// Unrecognized templates and roles other than system/user/assistant throw c10::Error.
//
// Example:
//   auto tok = slowed_examples::Tokenizer::from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf");
//   auto chat = slowed_examples::ChatTemplate::from_tokenizer(tok);
//   std::string s = chat.apply({{"user", "What is 2 + 2?"}});
//   // "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging
//   //  Face<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
//   std::vector<int32_t> ids = tok.encode(s, /*add_special_tokens=*/false);

#include <optional>
#include <string>
#include <vector>

namespace slowed_examples {

class Tokenizer;

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

enum class ChatFormat {
  ChatML,   // <|im_start|> ... <|im_end|>
  Llama3,   // Llama 3.0: BOS on the first message, no system block
  Llama31,  // Llama 3.1 / 3.2: system block with the knowledge and today's dates
  Plain,    // no template (base models): contents joined, EOS after assistant replies
};
const char* chat_format_name(ChatFormat f);

struct ChatTemplateOptions {
  bool add_generation_prompt = true;
  /// Llama 3.1 / 3.2 "Today Date"; empty: see the header comment.
  std::string date_string;
  ChatTemplateOptions& with_add_generation_prompt(bool v) { add_generation_prompt = v; return *this; }
  ChatTemplateOptions& with_date_string(std::string v) { date_string = std::move(v); return *this; }
};

class ChatTemplate {
 public:
  /// Recognizes the format of a Jinja template source. `bos_token` is the text Llama templates
  /// write for {{ bos_token }}. Throws naming `source` when the template is empty or unknown.
  static ChatTemplate from_template(const std::string& jinja, const std::string& bos_token = "",
                                    const std::string& source = "<chat template>");
  /// The tokenizer's chat_template() with its BOS token text. A tokenizer without a template
  /// throws, unless plain_if_missing: then the Plain format with its EOS token text.
  static ChatTemplate from_tokenizer(const Tokenizer& tokenizer, bool plain_if_missing = false);
  /// A format directly (default system prompt none unless given). `special_token` is the BOS
  /// text for the Llama formats and the EOS text for Plain.
  static ChatTemplate from_format(ChatFormat format, const std::string& special_token = "",
                                  std::optional<std::string> default_system = std::nullopt);

  ChatFormat format() const { return format_; }
  /// ChatML: the system message inserted when the conversation has none.
  const std::optional<std::string>& default_system_prompt() const { return default_system_; }
  /// Llama 3.1/3.2: whether the template takes today's date (strftime_now).
  bool uses_today_date() const { return uses_strftime_; }

  /// The prompt string; `messages` must not be empty.
  std::string apply(const std::vector<ChatMessage>& messages,
                    const ChatTemplateOptions& options = ChatTemplateOptions()) const;

 private:
  ChatFormat format_ = ChatFormat::ChatML;
  std::string bos_;  // Llama: BOS text; Plain: EOS text
  std::optional<std::string> default_system_;
  bool uses_strftime_ = false;
};

/// Shorthand: ChatTemplate::from_tokenizer(tokenizer).apply(messages, options).
std::string apply_chat_template(const Tokenizer& tokenizer, const std::vector<ChatMessage>& messages,
                                const ChatTemplateOptions& options = ChatTemplateOptions());

namespace detail {
/// Jinja's |trim (Python str.strip(): Unicode whitespace at both ends); exposed for tests.
std::string jinja_trim(const std::string& s);
}  // namespace detail

}  // namespace slowed_examples
